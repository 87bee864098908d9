"""chestssl.data.portable_math: close to NumPy, and the same bits whatever SIMD code NumPy,
OpenBLAS and the C library pick for the CPU (forced here with their environment variables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from chestssl.data import portable_math as pm

#: Environments that make NumPy, OpenBLAS and glibc take other code paths on this machine:
#: as found, without AVX-512, and with SSE4.2 only (x86-64-v2, NumPy's baseline).
CPU_SETTINGS = {
    "as found": {},
    "no AVX-512": {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR", "OPENBLAS_CORETYPE": "Haswell",
                   "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"},
    "x86-64-v2": {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR", "OPENBLAS_CORETYPE": "Prescott",
                  "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F"},
}


def run_under(settings: dict[str, str], code: str) -> str:
    """stdout of ``python -c code`` with the CPU ``settings`` in its environment."""
    env = {**os.environ, **settings}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(-30.0, 30.0, 200_000), rng.normal(size=200_000)


def test_each_function_is_close_to_numpy():
    x, y = _inputs()
    assert np.max(np.abs(pm.exp(x) / np.exp(x) - 1)) < 1e-15
    positive = np.exp(x)
    assert np.max(np.abs(pm.log(positive) - x) / np.maximum(1.0, np.abs(x))) < 1e-15
    assert np.max(np.abs(pm.sigmoid(y) - 1 / (1 + np.exp(-y)))) < 1e-15
    assert np.max(np.abs(pm.sin(x) - np.sin(x))) < 1e-15 and np.max(np.abs(pm.cos(x) - np.cos(x))) < 1e-15
    assert np.max(np.abs(pm.arctan2(y, x) - np.arctan2(y, x))) < 2e-15
    base = np.abs(x) / 3
    assert np.max(np.abs(pm.power(base, y) / np.power(base, y) - 1)) < 1e-14
    assert pm.dot(np.arange(4.0), np.arange(4.0)) == 14.0


def test_gaussian_filter_is_scipys_with_portable_kernels():
    from scipy import ndimage

    image = np.random.default_rng(1).normal(size=(20, 30, 7))
    for sigma, mode, truncate in (((1.0, 1.0, 1.0), "reflect", 4.0), ((0.7, 0.7), "wrap", 1.5),
                                  ((0.0, 0.0, 2.0), "nearest", 4.0)):
        widths = tuple(sigma) + (0.0,) * (image.ndim - len(sigma))
        expected = ndimage.gaussian_filter(image, widths, mode=mode, truncate=truncate)
        assert np.max(np.abs(pm.gaussian_filter(image, sigma, mode=mode, truncate=truncate) - expected)) < 1e-14
    with pytest.raises(ValueError, match="4 widths for a 3-D image"):
        pm.gaussian_filter(image, (1.0,) * 4)


def test_edges():
    assert pm.exp(np.array([-1000.0, 1000.0, 0.0])).tolist() == [0.0, np.inf, 1.0]
    assert np.isnan(pm.exp(np.nan)) and np.isnan(pm.log(-1.0))
    assert pm.log(np.array([0.0, 1.0, np.inf])).tolist() == [-np.inf, 0.0, np.inf]
    assert pm.power(np.array([0.0, 0.0, 4.0]), np.array([0.0, 2.0, 0.5])).tolist() == [1.0, 0.0, 2.0]
    corners = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(pm.arctan2(corners[:, 0], corners[:, 1]), np.arctan2(corners[:, 0], corners[:, 1]),
                               rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="negative base"):
        pm.power(-1.0, 2.0)
    with pytest.raises(ValueError, match="up to 100000"):
        pm.sin(1e6)


_DIGESTS = """
import hashlib, json
import numpy as np
from chestssl.data import portable_math as pm
rng = np.random.default_rng(0)
x, y = rng.uniform(-30.0, 30.0, 200_000), rng.normal(size=200_000)
out = {name: f() for name, f in {
    "exp": lambda: pm.exp(x), "log": lambda: pm.log(np.abs(x) * 1e3), "sin": lambda: pm.sin(x), "cos": lambda: pm.cos(x),
    "arctan2": lambda: pm.arctan2(y, x), "power": lambda: pm.power(np.abs(x), y), "sigmoid": lambda: pm.sigmoid(y),
    "dot": lambda: np.array([pm.dot(x[:1000], y[:1000])]),
    "gaussian_filter": lambda: pm.gaussian_filter(y.reshape(400, 500), (0.7, 1.3), mode="reflect"),
    "numpy exp": lambda: np.exp(x), "numpy arctan2": lambda: np.arctan2(y, x), "blas dot": lambda: np.array([x[:1000] @ y[:1000]]),
}.items()}
print(json.dumps({name: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest() for name, v in out.items()}))
"""


def test_the_same_bits_whatever_simd_code_the_cpu_gets():
    digests = {name: json.loads(run_under(settings, _DIGESTS)) for name, settings in CPU_SETTINGS.items()}
    ours = [name for name in digests["as found"] if not name.startswith(("numpy", "blas"))]
    for name in ours:
        assert len({d[name] for d in digests.values()}) == 1, f"{name} differs across CPU settings"
    # The settings do reach NumPy's and OpenBLAS's dispatch (else this test shows nothing) where this
    # CPU has AVX-512: there, NumPy's own exp, arctan2 and BLAS's dot change bits.
    if "avx512f" in open("/proc/cpuinfo").read():
        for name in ("numpy exp", "numpy arctan2"):
            assert len({d[name] for d in digests.values()}) > 1, f"{name}: the settings changed nothing"
