"""Spatial transformer network (STN) that aligns chest radiographs to a canonical chest (seed 002).

Spatial transformer: Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015
(arXiv:1506.02025). Seed 002 (chest X-ray alignment with an STN) builds it as a
ResNet-18 that regresses five parameters ``(tx, ty, sx, sy, angle)`` through
FC 512 -> 256 -> ReLU -> FC 256 -> 5, whose last layer starts at zero weights and bias
``(0, 0, 1, 1, 0)``, so the network starts as the identity (:class:`AlignmentSTN`); the
radiograph is resampled with the affine of those parameters.

The geometry (parameterisation, warping, random misalignment) is
:mod:`chestssl.data.affine`; the canonical chest :mod:`chestssl.data.canonical_chest`;
the loss :class:`chestssl.models.losses.AlignmentLoss`; training through the project's
loop :class:`chestssl.methods.alignment.STNAlignment`; the parameter error
:mod:`chestssl.eval.alignment`.

This module also holds the STN's model file (``stn.pt``: :func:`stn_payload`,
:func:`load_alignment_stn`) and applying a trained STN to many radiographs
(:func:`apply_stn`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from chestssl.checks import positive_int
from chestssl.data.affine import (
    IDENTITY_PARAMS,
    PARAM_NAMES,
    affine_from_params,
    affine_transform,
    check_images,
    check_padding_mode,
    size_pair,
)
from chestssl.model_files import load_model_file
from chestssl.models.resnet import DEFAULT_BLOCK_INPLANES, ResNetBackbone

#: Hidden width of the regression head (seed 002: FC 512 -> 256 -> ReLU -> FC 256 -> 5).
DEFAULT_HIDDEN_DIM = 256
#: Format tag of ``stn.pt``.
STN_FORMAT = "chestssl-stn/1"
#: Radiographs per forward pass when a trained STN is applied.
APPLY_BATCH = 64


class STNOutput(NamedTuple):
    """What :class:`AlignmentSTN` returns."""

    #: The input resampled to the canonical frame, (B, 1, H', W').
    aligned: torch.Tensor
    #: The regressed ``(tx, ty, sx, sy, angle)``, (B, 5).
    params: torch.Tensor
    #: Their affine (:func:`~chestssl.data.affine.affine_from_params`), (B, 2, 3).
    theta: torch.Tensor


class AlignmentSTN(nn.Module):
    """Seed 002's STN: ResNet-18 features -> FC -> ReLU -> FC(5) -> affine -> resample.

    Args:
        output_size: (H', W') of the aligned image (seed 002: 320 x 256, the canonical
            chest's size); None keeps the input's size.
        block_inplanes: widths of the ResNet-18 layers 1..4 (MONAI's default
            ``(64, 128, 256, 512)``, giving the seed's 512 features); smaller for tests.
        hidden_dim: width of the hidden FC layer (seed: 256).
        padding_mode: what points outside the input read, ``"zeros"`` as in the seed.

    The trunk is the project's one-channel MONAI ResNet-18
    (:class:`chestssl.models.resnet.ResNetBackbone`, global-average-pooled layer4). The
    last FC layer is zero-initialised with bias ``(0, 0, 1, 1, 0)``, so at initialisation
    ``params`` is exactly the identity and the output is the input resampled to
    ``output_size``. The affine and the resampling are computed in float32 (also under
    autocast), so the alignment keeps its precision.

    ``forward(x)``: x (B, 1, H, W) -> :class:`STNOutput` ``(aligned (B, 1, H', W'),
    params (B, 5), theta (B, 2, 3))``. In training mode the trunk's batch norm needs more
    than one value per channel at layer4 (stride 32): a batch of two, or H, W > 32.
    """

    def __init__(
        self,
        output_size: int | Sequence[int] | None = None,
        block_inplanes: Sequence[int] = DEFAULT_BLOCK_INPLANES,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        self.output_size = None if output_size is None else size_pair(output_size, "stn.output_size")
        self.padding_mode = check_padding_mode(padding_mode)
        hidden_dim = positive_int(hidden_dim, "hidden_dim")
        self.features = ResNetBackbone("resnet18", spatial_dims=2, block_inplanes=block_inplanes, in_channels=1)
        self.head = nn.Sequential(
            nn.Linear(self.features.representation_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, len(PARAM_NAMES)),
        )
        self.reset_to_identity()
        self.transform = affine_transform(self.output_size, self.padding_mode)

    @property
    def regressor(self) -> nn.Linear:
        """The last FC layer, hidden_dim -> 5."""
        return self.head[-1]

    def reset_to_identity(self) -> None:
        """Zero the last layer's weights and set its bias to the identity ``(0, 0, 1, 1, 0)`` (seed 002)."""
        with torch.no_grad():
            self.regressor.weight.zero_()
            self.regressor.bias.copy_(torch.tensor(IDENTITY_PARAMS))

    def predict_params(self, x: torch.Tensor) -> torch.Tensor:
        """The regressed ``(tx, ty, sx, sy, angle)``: (B, 1, H, W) -> (B, 5)."""
        check_images(x, "AlignmentSTN input")
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> STNOutput:
        """(B, 1, H, W) -> (aligned (B, 1, H', W'), params (B, 5), theta (B, 2, 3))."""
        params = self.predict_params(x)
        theta = affine_from_params(params.float())
        with torch.autocast(device_type=x.device.type, enabled=False):
            aligned = self.transform(x.float(), theta)
        return STNOutput(aligned, params, theta)

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this STN."""
        return {
            "output_size": list(self.output_size) if self.output_size is not None else None,
            "block_inplanes": list(self.features.block_inplanes),
            "hidden_dim": int(self.regressor.in_features),
            "padding_mode": self.padding_mode,
        }


def stn_payload(stn: AlignmentSTN, canonical: torch.Tensor, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``stn.pt`` holds: format tag, the STN's config and CPU weights, the canonical chest (1, H', W')."""
    from chestssl.models.backbones import cpu_state_dict

    return {"format": STN_FORMAT, "config": stn.config(), "state_dict": cpu_state_dict(stn.state_dict()),
            "canonical": canonical.detach().cpu().to(torch.float32), **dict(extra or {})}


def load_alignment_stn(path: str | Path) -> tuple[AlignmentSTN, torch.Tensor]:
    """``(stn in eval mode, canonical chest (1, H', W'))`` from an ``stn.pt`` written by the stage
    ``align_radiographs`` (:func:`stn_payload`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected models/alignment/stn.pt, written by the stage "
                                "align_radiographs (dvc repro align_radiographs)")
    payload = load_model_file(path, "align_radiographs")
    if payload.get("format") != STN_FORMAT:
        found = payload.get("format")
        raise ValueError(f"{path}: not an alignment STN (format {found!r}, expected {STN_FORMAT!r}); "
                         "rerun the stage align_radiographs")
    stn = AlignmentSTN(**payload["config"])
    stn.load_state_dict(payload["state_dict"], strict=True)
    return stn.eval(), payload["canonical"]


@torch.no_grad()
def apply_stn(
    stn: AlignmentSTN, images: torch.Tensor, batch_size: int = APPLY_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained STN in eval mode on (N, 1, H, W) images -> (aligned (N, 1, H', W'), params (N, 5)), on CPU.

    Runs on the STN's device in batches; the STN's mode is restored afterwards.
    """
    device = next(stn.parameters()).device
    was_training = stn.training
    stn.eval()
    aligned, params = [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            output = stn(images[start : start + batch_size].to(device))
            aligned.append(output.aligned.cpu())
            params.append(output.params.cpu())
    finally:
        stn.train(was_training)
    return torch.cat(aligned), torch.cat(params)
