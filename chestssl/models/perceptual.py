"""Perceptual (feature-space) loss through a frozen feature network read from a local file.

The distance is LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric", CVPR 2018) in its "baseline" form, i.e. with unit weights per
channel instead of learned linear heads, which makes it the normalised feature
reconstruction loss of Johnson et al., "Perceptual Losses for Real-Time Style Transfer
and Super-Resolution", ECCV 2016::

    d(x, y) = sum_l mean_{b, s} sum_c (f_l(x) / |f_l(x)|_c - f_l(y) / |f_l(y)|_c)^2

where ``f_l`` are the feature maps of the network and ``|.|_c`` is the L2 norm over
channels at each position.

Nothing is downloaded: the feature network is a TorchScript file on disk, so the
pipeline stays offline. Its SHA-256 digest is given with its path and checked before the
file is read, so the exact network is an input the stage records (a params value DVC
tracks) and another file is refused. Its
contract: a scripted module that takes (B, 1, *S) images in [0, 1] and returns a
list/tuple of feature maps (B, C_l, *S_l), or a single one. :func:`save_feature_network`
writes such a file from any scriptable ``nn.Module``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from chestssl.io import file_sha256

#: Keeps the channel normalisation finite where all features are zero (as LPIPS).
NORM_EPS = 1e-10


def save_feature_network(module: nn.Module, path: str | Path) -> Path:
    """Script ``module`` (in eval mode) with ``torch.jit.script`` and save it to ``path``.

    The module must map (B, 1, *S) images in [0, 1] to a list/tuple of feature maps
    (or one map), and be scriptable. Parent folders are created. Returns the path, for
    ``loss.perceptual_weights`` in params.yaml, e.g.::

        save_feature_network(my_pretrained_ct_encoder, "models/perceptual/features.pt")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            torch.jit.script(module).save(str(path))
    finally:
        module.train(was_training)
    return path


def _normalise_channels(features: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm over the channel dimension at every position, (B, C, *S) -> (B, C, *S)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


class LocalPerceptualLoss(nn.Module):
    """LPIPS-baseline distance through a frozen TorchScript feature network.

    Args:
        weights_path: the TorchScript file (see the module docstring for its contract).
        sha256: the file's expected SHA-256 (64 hex digits); ``None``: not checked.
        param_key: the params key ``weights_path`` comes from, named in error messages.

    The network's parameters never require gradients and it stays in eval mode even
    when a parent module calls ``train()`` (batch-norm statistics and dropout of the
    feature network must not change with the training loop). Gradients do flow through
    it to the images.

    ``forward(input, target)``: two (B, 1, *S) images in [0, 1] -> 0-d loss, 0 when
    they are equal. Features are compared in float32.
    """

    def __init__(self, weights_path: str | Path, sha256: str | None = None, param_key: str = "loss.perceptual_weights"):
        super().__init__()
        self.weights_path = Path(weights_path)
        self.param_key = param_key
        fix = (
            "export a feature network with torch.jit.script(module).save(path) "
            "(chestssl.models.perceptual.save_feature_network), or set loss.perceptual to 0"
        )
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"{param_key}: no feature network file at {str(self.weights_path)!r}; {fix}")
        if sha256 is not None:
            digest = file_sha256(self.weights_path)
            if digest != sha256.lower():
                raise ValueError(
                    f"{param_key}: {str(self.weights_path)!r} has SHA-256 {digest}, not the {sha256} given with it; "
                    "point it at the intended file, or give this file's digest (sha256sum) if it replaced the other"
                )
        try:
            with warnings.catch_warnings():
                # TorchScript is the offline, code-free file format this loss is defined on.
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
                network = torch.jit.load(str(self.weights_path), map_location="cpu")
        except Exception as error:  # torch.jit.load raises RuntimeError/ValueError/zip errors
            raise ValueError(
                f"{param_key}: {str(self.weights_path)!r} is not a readable TorchScript file ({error}); {fix}"
            ) from error
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self.network = network.eval()

    def train(self, mode: bool = True) -> "LocalPerceptualLoss":
        super().train(mode)
        self.network.eval()
        return self

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The network's feature maps of ``image`` (B, 1, *S), as a list."""
        output = self.network(image)
        maps = [output] if isinstance(output, torch.Tensor) else list(output)
        if not maps or not all(isinstance(m, torch.Tensor) and m.dim() >= 3 for m in maps):
            raise ValueError(
                f"{self.param_key}: the network in {str(self.weights_path)!r} must return a feature map "
                "(B, C, *S) or a list/tuple of them; re-export it with save_feature_network"
            )
        return maps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(
                f"LocalPerceptualLoss: input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape"
            )
        # One pass for both images halves the calls; features are split back per image.
        maps = self.features(torch.cat([input, target], dim=0))
        batch = input.shape[0]
        loss = input.new_zeros((), dtype=torch.float32)
        for feature in maps:
            feature = _normalise_channels(feature.float())
            difference = (feature[:batch] - feature[batch:]).pow(2).sum(dim=1)
            loss = loss + difference.mean()
        return loss
