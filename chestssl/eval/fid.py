"""Fréchet Inception Distance between generated and real images, with a bootstrap interval.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017) is the Fréchet distance between Gaussians fitted to two sets of
feature vectors (MONAI ``FIDMetric``). Its value depends on the feature network, the
number of images and their resolution, so numbers are comparable only under one protocol:
seed 000 used Inception-v3 features of 1000 samples; :func:`fid_with_interval` records its
own sample counts, and the report names the feature network beside every value.

The interval resamples the generated and the real feature vectors (each set with
replacement, independently) and takes the percentiles of the FIDs of the resamples; it
describes the estimator's spread at these sample counts, whose bias (FID falls as the
counts grow) it does not remove.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from monai.metrics import FIDMetric

from chestssl.eval.bootstrap import metric_entry


def fid(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor) -> float:
    """FID between (N, F) ``generated`` and (M, F) ``real`` feature vectors."""
    generated, real = torch.as_tensor(np.asarray(generated)), torch.as_tensor(np.asarray(real))
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"features: got {tuple(generated.shape)} and {tuple(real.shape)}, expected (N, F) and (M, F)")
    if min(len(generated), len(real)) < 2:
        raise ValueError(f"features: got {len(generated)} generated and {len(real)} real vectors, expected 2 or more each")
    # MONAI prints when it regularises a singular product, and passes SciPy's deprecated `disp`.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        return float(FIDMetric()(generated.double(), real.double()))


def fid_with_interval(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, n_bootstrap: int,
                      confidence: float, seed: int) -> dict:
    """The metrics-file record of FID (``value``, ``ci_low``, ``ci_high``) over ``n_bootstrap``
    resamples of both sets (none: no interval), with ``n_generated``, ``n_real`` and
    ``features`` (F)."""
    generated, real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    value = fid(generated, real)
    extra = {"n_generated": int(len(generated)), "n_real": int(len(real)), "features": int(generated.shape[1])}
    if n_bootstrap < 1:
        return {**metric_entry(value, None, None, "no bootstrap (evaluate.bootstrap_samples: 0)"), **extra}
    rng = np.random.default_rng(seed)
    samples = np.array([
        fid(generated[rng.integers(0, len(generated), len(generated))], real[rng.integers(0, len(real), len(real))])
        for _ in range(n_bootstrap)
    ])
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return {**metric_entry(value, low, high), **extra}
