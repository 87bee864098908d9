"""Elementary functions whose float64 results are the same bits on every x86-64 CPU.

NumPy picks, at run time, SIMD implementations of ``exp``, ``log``, ``arctan2`` and
``power`` for the CPU it runs on (AVX2, AVX-512, ...), and they differ from the baseline
in the last bits; OpenBLAS picks its ``dot`` kernels likewise. A phantom rendered on two
machines then differs in a few voxels, where a value close to a rounding boundary falls on
either side, and every hash downstream changes. These functions use only operations that
IEEE 754 rounds exactly, whatever the vector width: ``+ - * /``, ``sqrt``, ``rint``,
``frexp`` and ``ldexp``, each one NumPy call (NumPy never fuses a multiply and an add).
(``sin`` and ``cos`` come from the C library in NumPy today, which may itself choose an
FMA variant by CPU; they are here too.)

Accuracy: a few units in the last place of float64 (tested against NumPy), which is far
below anything the phantom's rendering resolves; the results are reproducible bit for bit,
not correctly rounded.

Methods: Cody and Waite's argument reduction for ``exp``, ``sin`` and ``cos`` (W. J. Cody, W. Waite, *Software
Manual for the Elementary Functions*, 1980); ``log`` through ``atanh`` series of
``(m - 1) / (m + 1)``; ``arctan`` by argument halving, ``atan(u) = 2 atan(u / (1 +
sqrt(1 + u^2)))``, then its Taylor series.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_LN2_HI = 6.93147180369123816490e-01  # ln 2 with its low bits zero, so n * _LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP_MAX, _EXP_MIN = 709.78, -745.13
#: 1/k! for k = 0..17: the Taylor series of exp on |r| <= ln2 / 2 to below 1e-17.
_EXP_COEFFICIENTS = (
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
    1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800, 1.0 / 87178291200,
    1.0 / 1307674368000, 1.0 / 20922789888000, 1.0 / 355687428096000,
)
_SQRT_HALF = 0.70710678118654752440
_PI = 3.14159265358979311600
_HALF_PI = 1.57079632679489655800


def _horner(coefficients: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """sum(c_k x^k) by Horner's rule, one multiply and one add per step."""
    result = np.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * x + c
    return result


def exp(x: np.ndarray | float) -> np.ndarray:
    """e**x (float64, any shape); 0 below -745, inf above 709.78."""
    x = np.asarray(x, dtype=np.float64)
    clipped = np.clip(np.where(np.isnan(x), 0.0, x), _EXP_MIN, _EXP_MAX)
    n = np.rint(clipped * _INV_LN2)
    r = (clipped - n * _LN2_HI) - n * _LN2_LO
    result = np.ldexp(_horner(_EXP_COEFFICIENTS, r), n.astype(np.int32))
    result = np.where(x > _EXP_MAX, np.inf, np.where(x < _EXP_MIN, 0.0, result))
    return np.where(np.isnan(x), np.nan, result)


def log(x: np.ndarray | float) -> np.ndarray:
    """Natural logarithm (float64) of ``x`` > 0; -inf at 0, nan below."""
    x = np.asarray(x, dtype=np.float64)
    positive = np.where((x > 0) & np.isfinite(x), x, 1.0)
    mantissa, exponent = np.frexp(positive)  # positive = mantissa * 2**exponent, mantissa in [0.5, 1)
    low = mantissa < _SQRT_HALF
    mantissa = np.where(low, mantissa * 2.0, mantissa)  # now in [sqrt(1/2), sqrt(2))
    exponent = (exponent - low).astype(np.float64)
    s = (mantissa - 1.0) / (mantissa + 1.0)  # |s| <= 0.1716
    s2 = s * s
    series = _horner(tuple(1.0 / (2 * k + 1) for k in range(14)), s2)  # atanh(s) / s
    result = 2.0 * s * series + (exponent * _LN2_HI + exponent * _LN2_LO)
    result = np.where(x == 0, -np.inf, result)
    return np.where((x < 0) | np.isnan(x), np.nan, np.where(np.isinf(x) & (x > 0), np.inf, result))


def power(base: np.ndarray | float, exponent: np.ndarray | float) -> np.ndarray:
    """``base ** exponent`` for ``base`` >= 0 (float64): exp(exponent * log(base)); 0 ** e
    is 0 for e > 0 and 1 for e = 0."""
    base = np.asarray(base, dtype=np.float64)
    exponent = np.asarray(exponent, dtype=np.float64)
    if bool(np.any(base < 0)):
        raise ValueError("power: a negative base")
    result = exp(exponent * log(np.where(base > 0, base, 1.0)))
    return np.where(base > 0, result, np.where(exponent == 0, 1.0, 0.0))


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """1 / (1 + e**-x) (float64)."""
    return 1.0 / (1.0 + exp(-np.asarray(x, dtype=np.float64)))


# pi / 2 in three parts with low bits zero, so n * part is exact for |n| < 2**20 (Cody-Waite).
_PIO2_1 = 1.57079632673412561417e00
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_INV_PIO2 = 6.36619772367581382433e-01
_SIN_MAX_ARGUMENT = 1.0e5
#: The Taylor series of sin(r) / r and cos(r) in r^2 on |r| <= pi / 4, to below 1e-17.
_SIN_COEFFICIENTS = tuple((-1.0) ** k / float(np.prod(np.arange(1, 2 * k + 2, dtype=np.float64))) for k in range(11))
_COS_COEFFICIENTS = tuple((-1.0) ** k / float(np.prod(np.arange(1, 2 * k + 1, dtype=np.float64))) for k in range(11))


def _quadrant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if bool(np.any(np.abs(x) > _SIN_MAX_ARGUMENT)):
        raise ValueError(f"sin/cos: arguments up to {_SIN_MAX_ARGUMENT:g} in magnitude only")
    n = np.rint(x * _INV_PIO2)
    r = ((x - n * _PIO2_1) - n * _PIO2_2) - n * _PIO2_3
    return r, np.mod(n.astype(np.int64), 4)


def _sin_cos_reduced(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r2 = r * r
    return r * _horner(_SIN_COEFFICIENTS, r2), _horner(_COS_COEFFICIENTS, r2)


def sin(x: np.ndarray | float) -> np.ndarray:
    """sin(x) (float64) for |x| <= 1e5."""
    r, quadrant = _quadrant(np.asarray(x, dtype=np.float64))
    s, c = _sin_cos_reduced(r)
    return np.choose(quadrant, (s, c, -s, -c))


def cos(x: np.ndarray | float) -> np.ndarray:
    """cos(x) (float64) for |x| <= 1e5."""
    r, quadrant = _quadrant(np.asarray(x, dtype=np.float64))
    s, c = _sin_cos_reduced(r)
    return np.choose(quadrant, (c, -s, -c, s))


def _arctan_unit(t: np.ndarray) -> np.ndarray:
    """arctan(t) for t in [0, 1]: three halvings bring t below tan(pi/32) ~ 0.0985, where
    the odd Taylor series converges to below 1e-17 in 9 terms."""
    for _ in range(3):
        t = t / (1.0 + np.sqrt(1.0 + t * t))
    t2 = t * t
    series = _horner(tuple((-1.0) ** k / (2 * k + 1) for k in range(10)), t2)
    return 8.0 * t * series


def arctan2(y: np.ndarray | float, x: np.ndarray | float) -> np.ndarray:
    """The angle of (x, y) in [-pi, pi] (float64), as ``numpy.arctan2`` for finite input
    (``arctan2(0, 0)`` is 0, and the sign of a zero ``y`` is not kept)."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    ay, ax = np.abs(y), np.abs(x)
    big, small = np.maximum(ay, ax), np.minimum(ay, ax)
    t = np.where(big > 0, small / np.where(big > 0, big, 1.0), 0.0)
    angle = _arctan_unit(t)  # in [0, pi/4]
    angle = np.where(ay > ax, _HALF_PI - angle, angle)  # in [0, pi/2]
    angle = np.where(x < 0, _PI - angle, angle)  # in [0, pi]
    return np.where(y < 0, -angle, angle)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """The dot product of two 1-D vectors, summed left to right (no BLAS kernel)."""
    total = 0.0
    for u, v in zip(np.asarray(a, np.float64).tolist(), np.asarray(b, np.float64).tolist()):
        total += u * v
    return total


def gaussian_filter(image: np.ndarray, sigma: Sequence[float], mode: str = "nearest",
                    truncate: float = 4.0) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter`` (order 0) of ``image`` as float64, with kernels from
    :func:`exp` normalised by ``math.fsum``: the same bits on every CPU (SciPy builds its
    kernels with ``numpy.exp``; its separable correlation itself is plain C, one multiply and
    one add at a time). ``sigma``: one width per leading axis (axes beyond it are not
    filtered), 0 skips that axis; ``mode`` and ``truncate`` as SciPy's."""
    from scipy import ndimage

    out = np.asarray(image, dtype=np.float64)
    if len(sigma) > out.ndim:
        raise ValueError(f"gaussian_filter: {len(sigma)} widths for a {out.ndim}-D image")
    for axis, width in enumerate(sigma):
        if width <= 0:
            continue
        radius = int(truncate * float(width) + 0.5)
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        weights = exp(-0.5 * (x * x) / (float(width) * float(width)))
        weights = weights / math.fsum(weights.tolist())
        out = ndimage.correlate1d(out, weights, axis=axis, mode=mode, output=np.float64)
    return out
