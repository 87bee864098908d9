"""A real chest X-ray dataset into the radiographs folder, on tiny fake trees in the
published layouts (tests/data/test_cxr.py), and the radiograph stages on it."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestssl.data.cxr import COVID_CLASSES, CXRDataError, load_radiograph
from chestssl.data.cxr_import import import_radiographs
from chestssl.data.radiograph_datasets import RadiographDataset, RadiographStudyDataset
from chestssl.data.radiograph_folder import open_radiograph_folder
from tests.shipped_params import read_shipped_params
from test_cxr import build_covid, build_mimic, chexpert_cfg, chexpert_root, write_image  # noqa: F401 (fixture)

SIZE = 32
REPO_ROOT = Path(__file__).resolve().parents[2]


def leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith("."))


def test_chexpert_studies_group_their_views_and_keep_the_label_policy(chexpert_root, tmp_path):
    out = tmp_path / "radiographs"
    studies = import_radiographs(chexpert_cfg(chexpert_root, uncertain="ignore"), out, SIZE)
    folder = open_radiograph_folder(out)
    assert folder.source == "chexpert" and len(folder.label_names) == 14 and folder.masks is None
    assert folder.studies["study_id"].tolist() == studies["study_id"].tolist()
    first = folder.studies.set_index("study_id").loc["patient00001/study1"]
    assert first["Cardiomegaly"] == 1.0 and first["Pneumonia"] == 0.0 and math.isnan(first["Edema"])
    assert first["num_images"] == 2
    views = folder.images[folder.images["study_id"] == "patient00001/study1"]
    assert views["view"].tolist() == ["frontal", "lateral"]
    assert views["path"].tolist() == ["train/patient00001/study1/view1_frontal.jpg",
                                      "train/patient00001/study1/view2_lateral.jpg"]
    expected = load_radiograph(chexpert_root / views["path"].iloc[0], SIZE).astype(np.float16)
    np.testing.assert_array_equal(folder.pixels[views.index[0]], expected)
    # The listed but absent image is listed with its reason, never silently dropped.
    skipped = pd.read_csv(out / "skipped.csv")
    assert len(skipped) == 1 and "patient00009" in skipped["path"].iloc[0] and folder.info["skipped_images"] == 1
    assert (folder.studies.loc[folder.studies["split"] == "test", "patient_id"] == "patient64541").all()
    assert leftovers(out) == []

    study = RadiographStudyDataset(out, "test")[0]
    assert study["images"].shape == (2, 1, SIZE, SIZE) and study["views"] == ("frontal", "lateral")
    frontal = import_radiographs(chexpert_cfg(chexpert_root, frontal_only=True, labels=["Edema"]), out, SIZE)
    assert frontal["num_images"].max() == 1 and open_radiograph_folder(out).label_names == ["Edema"]


def test_covid_classes_become_one_binary_label_each(tmp_path):
    build_covid(tmp_path / "covid", nested=True)
    out = tmp_path / "radiographs"
    import_radiographs({"source": "covid_radiography", "root": str(tmp_path / "covid")}, out, SIZE)
    folder = open_radiograph_folder(out)
    assert folder.label_names == list(COVID_CLASSES)
    labels = folder.label_matrix()
    assert labels.shape == (20, 4) and (labels.sum(axis=1) == 1).all() and (labels.sum(axis=0) == 5).all()
    assert (folder.images["view"] == "frontal").all() and "masks" not in "".join(folder.images["path"])


def test_mimic_studies_keep_a_variable_number_of_views(tmp_path):
    build_mimic(tmp_path / "mimic")
    out = tmp_path / "radiographs"
    studies = import_radiographs({"source": "mimic_cxr", "root": str(tmp_path / "mimic")}, out, SIZE)
    counts = dict(zip(studies["study_id"], studies["num_images"]))
    assert counts["50000001"] == 2 and counts["50000005"] == 1 and counts["50000006"] == 1
    for split in ("train", "val", "test"):
        data = RadiographStudyDataset(out, split)
        assert {item["study_id"]: item["images"].shape[0] for item in data} == {
            study_id: counts[study_id] for study_id in data.frame["study_id"]}
        assert sum(len(item["views"]) for item in data) == len(RadiographDataset(out, split))


def _counting_loader(monkeypatch, stop_at: int | None):
    import chestssl.data.cxr_import as module

    calls = {"n": 0}
    real = module.load_radiograph

    def loader(path, size):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(module, "load_radiograph", loader)
    return calls


def test_an_interrupted_import_resumes_where_it_stopped(chexpert_root, tmp_path, monkeypatch):
    out = tmp_path / "radiographs"
    cfg = chexpert_cfg(chexpert_root)
    _counting_loader(monkeypatch, stop_at=5)
    with pytest.raises(KeyboardInterrupt):
        import_radiographs(cfg, out, SIZE)
    assert not out.exists() and leftovers(out) == [".radiographs.partial"]
    calls = _counting_loader(monkeypatch, stop_at=None)
    import_radiographs(cfg, out, SIZE)
    total = len(open_radiograph_folder(out).images)
    assert calls["n"] == total - 4  # the first four images were kept
    import_radiographs(cfg, tmp_path / "fresh", SIZE)
    assert (out / "images.npy").read_bytes() == (tmp_path / "fresh" / "images.npy").read_bytes()
    assert leftovers(out) == []


def test_an_unreadable_image_is_named_and_the_previous_output_kept(chexpert_root, tmp_path):
    out = tmp_path / "radiographs"
    import_radiographs(chexpert_cfg(chexpert_root), out, SIZE)
    before = (out / "images.npy").read_bytes()
    broken = chexpert_root / "train" / "patient00003" / "study1" / "view1_frontal.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(CXRDataError, match=r"patient00003/study1/view1_frontal\.jpg: not a readable image"):
        import_radiographs(chexpert_cfg(chexpert_root), out, SIZE)
    assert (out / "images.npy").read_bytes() == before
    write_image(broken)
    import_radiographs(chexpert_cfg(chexpert_root), out, SIZE)
    assert leftovers(out) == []


def test_stage_script_imports_the_dataset_of_data_cxr(chexpert_root, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("radiographs_stage", REPO_ROOT / "stages" / "radiographs.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(tmp_path)
    params = {"radiographs": {"side": SIZE}, "data": {"cxr": chexpert_cfg(chexpert_root)}}
    monkeypatch.setattr(stage, "load_params", lambda: params)
    stage.main([])
    assert open_radiograph_folder(tmp_path / "data" / "radiographs").source == "chexpert"
    assert "chexpert studies" in capsys.readouterr().out


def test_pretraining_probing_and_alignment_run_on_an_imported_dataset(tmp_path):
    """The radiograph stages' library calls, unchanged, on COVID-19 Radiography's four classes."""
    from chestssl.params import validate
    from chestssl.pipeline.align_radiographs import align_radiographs
    from chestssl.pipeline.pretrain_radiographs import pretrain_radiographs
    from tests.tiny_configs import drop_radiograph_runs_of_absent_encoders, shrink_params

    build_covid(tmp_path / "covid", nested=False, per_class=8)
    radiographs = tmp_path / "radiographs"
    import_radiographs({"source": "covid_radiography", "root": str(tmp_path / "covid"), "val_fraction": 0.25,
                        "test_fraction": 0.25}, radiographs, 64)
    raw = read_shipped_params()
    shrink_params(raw)
    raw["pretrain_radiographs"].update(methods=["barlow_twins"], views=["frontal"], study_methods=[],
                                       train={"epochs": 1, "batch_size": 8})
    raw["evaluate"]["bootstrap_samples"] = 10
    raw["alignment"].update(feature_method="barlow_twins", steps=2, batch_size=4, block_inplanes=[4, 8, 8, 8])
    drop_radiograph_runs_of_absent_encoders(raw)
    params = validate(raw)
    out = tmp_path / "out"
    metrics = pretrain_radiographs(params, "barlow_twins", radiographs, out / "model", out / "report",
                                   out / "ckpt.pt")
    assert metrics["labels"] == list(COVID_CLASSES)
    probed = metrics["probe"]["mean"]["labels"]
    assert probed and set(probed) <= set(COVID_CLASSES)
    # Each class is one grey level in this tree: a linear probe separates it perfectly.
    assert all(metrics["probe"][name]["auroc"]["value"] == 1.0 for name in probed)

    aligned = align_radiographs(params, radiographs, out / "model" / "encoder.pt", out / "stn", out / "alignment",
                                out / "stn_ckpt.pt")
    assert set(aligned["auroc"]) == {*COVID_CLASSES, "mean"}
    examples = np.load(out / "alignment" / "examples.npz")
    assert all(study_id.startswith(tuple(name.replace(" ", "_") for name in COVID_CLASSES))
               for study_id in examples["study_id"])
    assert json.loads((out / "alignment" / "metrics.json").read_text())["canonical"]["n_images"] == 16
    assert aligned["images_used"]["train"] == {"used": 16, "of": 16}
