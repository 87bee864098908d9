"""FID (the Fréchet distance of two fitted Gaussians, as MONAI's FIDMetric) and its bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from chestssl.eval.fid import fid, fid_with_interval


def test_fid_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    assert fid(real, real) == pytest.approx(0.0, abs=1e-6)
    near, far = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 1.0
    # Two draws of one Gaussian: small; a shift of 1 in each of 8 dimensions adds about 8.
    assert fid(near, real) < 0.5 and fid(far, real) == pytest.approx(8.0, abs=1.5)


@pytest.mark.parametrize("n_generated, features", [(300, 16), (40, 64)])
def test_fid_is_monai_fidmetric(n_generated, features):
    # The second case has fewer generated vectors than features: a singular covariance, where
    # MONAI adds 1e-6 to both diagonals and the eigenvalue form needs no offset.
    import torch
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(features, features)) / np.sqrt(features)
    generated = rng.normal(size=(n_generated, features)) @ mixing + 0.3
    real = rng.normal(size=(500, features)) @ mixing.T
    expected = float(FIDMetric()(torch.from_numpy(generated), torch.from_numpy(real)))
    assert fid(generated, real) == pytest.approx(expected, rel=1e-6, abs=1e-4)


def test_one_feature_is_the_gaussian_formula():
    rng = np.random.default_rng(4)
    a, b = rng.normal(1.0, 2.0, size=(50, 1)), rng.normal(0.0, 0.5, size=(60, 1))
    sa, sb = a.std(ddof=1), b.std(ddof=1)
    assert fid(a, b) == pytest.approx((a.mean() - b.mean()) ** 2 + (sa - sb) ** 2, rel=1e-9)


def test_the_interval_holds_the_value_and_follows_the_seed():
    rng = np.random.default_rng(1)
    generated, real = rng.normal(size=(200, 4)) + 0.5, rng.normal(size=(300, 4))
    record = fid_with_interval(generated, real, n_bootstrap=50, confidence=0.9, seed=3)
    assert record["ci_low"] <= record["value"] <= record["ci_high"]
    assert (record["n_generated"], record["n_real"], record["features"]) == (200, 300, 4)
    assert fid_with_interval(generated, real, n_bootstrap=50, confidence=0.9, seed=3) == record
    without = fid_with_interval(generated, real, n_bootstrap=0, confidence=0.9, seed=3)
    assert without["ci_low"] is None and without["value"] == record["value"] and "no bootstrap" in without["note"]


def test_feature_sets_of_other_widths_are_refused():
    with pytest.raises(ValueError, match=r"expected \(N, F\) and \(M, F\)"):
        fid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="expected 2 or more each"):
        fid(np.zeros((1, 3)), np.zeros((4, 3)))
