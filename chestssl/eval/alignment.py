"""How well an alignment STN undoes a known misalignment, and what alignment changes in a probe (seed 002).

Seed 002 (chest X-ray alignment with a spatial transformer; Jaderberg et al., "Spatial
Transformer Networks", NeurIPS 2015, arXiv:1506.02025) compares a downstream classifier
on radiographs without and with alignment. Here:

- parameter error (:func:`alignment_parameter_error`): radiographs moved by a known affine
  (:func:`chestssl.data.affine.misalign`) are aligned by the STN; the mean displacement of
  the image corners under the known transform (before) and under it chained with the
  STN's (after), in pixels, and the fraction undone (:class:`AlignmentError`);
- the linear probe without and with alignment, per label (:func:`compare_aurocs`).

Shapes: params (B, 5) ``(tx, ty, sx, sy, angle)`` or theta (B, 2, 3), in the convention
of :mod:`chestssl.data.affine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from chestssl.data.affine import as_theta, chain_affines, size_pair

#: The probe conditions of the alignment experiment: radiographs misaligned and left so,
#: misaligned then aligned by the STN, and as stored (the reference without any misalignment).
CONDITIONS = ("misaligned", "aligned", "as_rendered")


@dataclass(frozen=True)
class AlignmentError:
    """Mean corner displacement of a misalignment before and after the STN, per image.

    ``before`` (B,): how far the applied transform moves the image corners; ``after``
    (B,): how far the applied transform chained with the predicted one moves them (0 when
    the prediction undoes it exactly). In pixels when an image size was given, else in
    normalised units.
    """

    before: torch.Tensor
    after: torch.Tensor

    @property
    def fraction_undone(self) -> float:
        """``1 - mean(after) / mean(before)``: 1 when undone exactly, 0 when not at all, < 0 when worse."""
        before = float(self.before.mean())
        if before == 0:
            raise ValueError("fraction_undone: the applied transform is the identity, there is nothing to undo")
        return 1.0 - float(self.after.mean()) / before


def mean_corner_displacement(theta: torch.Tensor, image_size: Sequence[int] | None = None) -> torch.Tensor:
    """Mean distance by which theta (B, 2, 3) (or params (B, 5)) moves the four image corners ``(+-1, +-1)`` -> (B,).

    In pixels of an (H, W) image when ``image_size`` is given (a normalised unit is W/2
    pixels along x, H/2 along y), else in normalised units.
    """
    theta = as_theta(theta, "theta")
    corners = theta.new_tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    moved = corners @ theta.transpose(1, 2)  # (B, 4, 2): where each output corner samples
    displacement = moved - corners[:, :2]
    if image_size is not None:
        height, width = size_pair(tuple(image_size), "image_size")
        displacement = displacement * displacement.new_tensor([width / 2, height / 2])
    return displacement.norm(dim=-1).mean(dim=-1)


def alignment_parameter_error(
    predicted: torch.Tensor, applied: torch.Tensor, image_size: Sequence[int] | None = None
) -> AlignmentError:
    """How much of an applied misalignment the predicted transform undoes.

    ``applied``: the transform that moved the images (params (B, 5) or theta (B, 2, 3),
    e.g. from :func:`~chestssl.data.affine.misalign`); ``predicted``: what the STN
    predicted on the moved images (same forms). The aligned image is the original warped
    with ``chain_affines(applied, predicted)``; :class:`AlignmentError` holds the mean
    corner displacement of ``applied`` (before) and of that chain (after), in pixels of
    ``image_size`` (H, W) when given. ``error.fraction_undone`` is the share of the
    misalignment removed.
    """
    applied_theta = as_theta(applied, "applied").detach()
    predicted_theta = as_theta(predicted, "predicted").detach().to(applied_theta)
    if predicted_theta.shape[0] != applied_theta.shape[0]:
        raise ValueError(
            f"alignment_parameter_error: {predicted_theta.shape[0]} predicted and {applied_theta.shape[0]} "
            "applied transforms; expected one of each per image"
        )
    return AlignmentError(
        before=mean_corner_displacement(applied_theta, image_size),
        after=mean_corner_displacement(chain_affines(applied_theta, predicted_theta), image_size),
    )


def _auroc_entry(probe_label: Mapping[str, Any]) -> dict[str, Any]:
    """The probe's AUROC of one label ``{value, ci_low, ci_high[, note]}``; null with the reason when skipped."""
    if "skipped" in probe_label:
        return {"value": None, "ci_low": None, "ci_high": None, "note": str(probe_label["skipped"])}
    return dict(probe_label["auroc"])


def _difference(with_value: float | None, without_value: float | None) -> float | None:
    return None if with_value is None or without_value is None else float(with_value - without_value)


def compare_aurocs(probes: Mapping[str, Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """Per label and for the mean over labels: AUROC without / with alignment and their difference.

    ``probes``: :func:`~chestssl.eval.linear_probe.fit_linear_probe` results by condition
    (:data:`CONDITIONS`). Returns ``{label: {"without_alignment": entry, "with_alignment":
    entry, "as_rendered": entry, "difference": float | None, "n_images", "n_patients"},
    "mean": {"without_alignment": float | None, ..., "difference": float | None}}``, the
    difference being that of the point estimates (with - without).
    """
    comparison: dict[str, Any] = {}
    for label in labels:
        entries = {"without_alignment": _auroc_entry(probes["misaligned"][label]),
                   "with_alignment": _auroc_entry(probes["aligned"][label]),
                   "as_rendered": _auroc_entry(probes["as_rendered"][label])}
        probed = probes["aligned"][label]
        comparison[label] = {
            **entries,
            "difference": _difference(entries["with_alignment"]["value"], entries["without_alignment"]["value"]),
            "n_images": probed.get("n_images"),
            "n_patients": probed.get("n_patients"),
        }
    means = {"without_alignment": probes["misaligned"]["mean"]["auroc"],
             "with_alignment": probes["aligned"]["mean"]["auroc"],
             "as_rendered": probes["as_rendered"]["mean"]["auroc"]}
    comparison["mean"] = {**means, "difference": _difference(means["with_alignment"], means["without_alignment"]),
                          "labels": list(probes["aligned"]["mean"]["labels"])}
    return comparison
