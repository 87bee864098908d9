"""How much of a known misalignment a predicted transform undoes (seed 002), and the AUROC comparison."""

from __future__ import annotations

import pytest
import torch

from chestssl.data.affine import IDENTITY_PARAMS, affine_from_params
from chestssl.eval.alignment import alignment_parameter_error, compare_aurocs, mean_corner_displacement
from tests.alignment_images import shift_params


def test_parameter_error_of_a_shift_in_pixels():
    applied = shift_params(3.0, -4.0, 32)
    exact_inverse = shift_params(-3.0, 4.0, 32)
    error = alignment_parameter_error(exact_inverse, applied, image_size=(32, 32))
    torch.testing.assert_close(error.before, torch.tensor([5.0]))  # every corner moves by (3, -4)
    assert float(error.after) < 1e-5 and error.fraction_undone == pytest.approx(1.0, abs=1e-6)
    nothing = alignment_parameter_error(torch.tensor([IDENTITY_PARAMS]), applied, image_size=(32, 32))
    torch.testing.assert_close(nothing.after, nothing.before)
    assert nothing.fraction_undone == pytest.approx(0.0, abs=1e-6)
    half = alignment_parameter_error(shift_params(-1.5, 2.0, 32), applied, image_size=(32, 32))
    assert half.fraction_undone == pytest.approx(0.5, abs=1e-5)


def test_corner_displacement_of_params_and_theta_agree_and_the_identity_moves_nothing():
    params = torch.tensor([[0.1, -0.05, 1.0, 1.0, 0.0], list(IDENTITY_PARAMS)])
    torch.testing.assert_close(mean_corner_displacement(params), mean_corner_displacement(affine_from_params(params)))
    in_pixels = mean_corner_displacement(params, image_size=(20, 40))
    torch.testing.assert_close(in_pixels, torch.tensor([((0.1 * 20) ** 2 + (0.05 * 10) ** 2) ** 0.5, 0.0]))
    with pytest.raises(ValueError, match="1 predicted and 2 applied"):
        alignment_parameter_error(params[:1], params)


def test_compare_aurocs_gives_the_difference_of_the_point_estimates_and_null_for_skipped_labels():
    def probe(value):
        entry = {"auroc": {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}, "n_images": 4,
                 "n_patients": 2}
        return {"nodule": entry, "malignant": {"skipped": "one class only"},
                "mean": {"auroc": value, "labels": ["nodule"]}}

    comparison = compare_aurocs({"misaligned": probe(0.5), "aligned": probe(0.75), "as_rendered": probe(0.8)},
                                ["nodule", "malignant"])
    assert comparison["nodule"]["difference"] == pytest.approx(0.25)
    assert comparison["nodule"]["as_rendered"]["value"] == 0.8 and comparison["nodule"]["n_patients"] == 2
    assert comparison["malignant"]["difference"] is None
    assert comparison["malignant"]["with_alignment"] == {"value": None, "ci_low": None, "ci_high": None,
                                                         "note": "one class only"}
    assert comparison["mean"] == {"without_alignment": 0.5, "with_alignment": 0.75, "as_rendered": 0.8,
                                  "difference": pytest.approx(0.25), "labels": ["nodule"]}
