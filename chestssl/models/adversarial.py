"""Hinge PatchGAN adversarial term for an autoencoder trained with one optimizer.

PatchGAN: Isola et al., "Image-to-Image Translation with Conditional Adversarial
Networks" (pix2pix), CVPR 2017: a convolutional discriminator scores overlapping patches.
Hinge form and adaptive weight as VQGAN (Esser et al., "Taming Transformers for
High-Resolution Image Synthesis", CVPR 2021)::

    lambda = weight * ||grad_last(L_rec)|| / (||grad_last(L_gen)|| + 1e-4)

with ``grad_last`` the gradient with respect to the decoder's last layer, so the
adversarial gradient reaching the decoder stays on the scale of the reconstruction one.

The discriminator is MONAI's :class:`~monai.networks.nets.PatchDiscriminator` and the
loss MONAI's :class:`~monai.losses.PatchAdversarialLoss` with ``criterion="hinge"``, which
squashes the logits with ``tanh`` before the hinge. With ``d = tanh(D(.))``::

    L_D   = 0.5 * (mean relu(1 - d(real)) + mean relu(1 + d(fake)))
    L_gen = mean relu(1 - d(fake)) = 1 - mean d(fake)

so ``L_gen`` has the gradient of VQGAN's ``-mean D(fake)`` on tanh-bounded logits.

The training loop has a single optimizer over every parameter and one backward of the
summed loss per step. The two losses are therefore built so that their gradients never
cross: the generator loss runs the discriminator with detached parameters
(``torch.func.functional_call``), so it moves only the autoencoder; the discriminator
loss sees ``fake.detach()``, so it moves only the discriminator.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from chestssl.checks import positive_int
from torch.func import functional_call

#: VQGAN's bounds on the adaptive weight and the epsilon of its denominator.
ADAPTIVE_MAX = 1e4
ADAPTIVE_EPS = 1e-4


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{key}: got {value!r}, expected a number >= 0")
    return float(value)


def patch_logits_size(size: int, num_layers: int) -> int:
    """Side of the logits map of a ``num_layers`` PatchDiscriminator for an input side ``size``.

    Kernel 4 / padding 1 convolutions: ``num_layers`` stride-2 ones halve the size
    (rounding down), then two stride-1 ones each take away one element.
    """
    for _ in range(num_layers):
        size //= 2
    return size - 2


class PatchAdversarialTerm(nn.Module):
    """Hinge PatchGAN discriminator and losses, safe to sum into one backward.

    Args:
        spatial_dims: 2 or 3.
        num_layers: intermediate layers of the PatchDiscriminator (``num_layers_d``); the
            receptive field and the down-sampling (``2**num_layers``) grow with it.
        channels: filters of the first discriminator layer (doubled per layer).
        weight: factor on the adversarial generator loss (VQGAN's ``disc_weight``).
        start_step: first training step with the adversarial term (VQGAN's ``disc_start``).
        adaptive: scale the generator loss by VQGAN's adaptive weight; otherwise by ``weight``.
        in_channels: image channels.

    Images are (B, in_channels, *S); every side of S must leave the logits map at least
    one element (see :func:`patch_logits_size`), e.g. >= 12 for 2 layers.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_layers: int = 2,
        channels: int = 32,
        weight: float = 0.6,
        start_step: int = 0,
        adaptive: bool = True,
        in_channels: int = 1,
    ):
        super().__init__()
        if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        self.num_layers = positive_int(num_layers, "num_layers")
        self.weight = _non_negative("weight", weight)
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or start_step < 0:
            raise ValueError(f"start_step: got {start_step!r}, expected an integer >= 0")
        self.start_step = int(start_step)
        self.adaptive = bool(adaptive)
        self.discriminator = PatchDiscriminator(
            spatial_dims=spatial_dims,
            num_layers_d=self.num_layers,
            channels=positive_int(channels, "channels"),
            in_channels=positive_int(in_channels, "in_channels"),
            out_channels=1,
        )
        self.criterion = PatchAdversarialLoss(criterion="hinge")

    def active(self, step: int) -> bool:
        """Whether the adversarial term is on at training step ``step`` (``step >= start_step``)."""
        return step >= self.start_step

    def _check_size(self, image: torch.Tensor) -> None:
        spatial = tuple(image.shape[2:])
        if len(spatial) != self.spatial_dims or min(patch_logits_size(s, self.num_layers) for s in spatial) < 1:
            smallest = 3 * 2**self.num_layers
            raise ValueError(
                f"PatchAdversarialTerm: images of spatial size {spatial} are too small for "
                f"num_layers={self.num_layers} (needs {self.spatial_dims} spatial dims, each >= {smallest})"
            )

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, *S_l) of the discriminator, with gradients to everything."""
        self._check_size(image)
        return self.discriminator(image)[-1]

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        """Hinge generator loss of ``fake`` (0-d); its gradient reaches ``fake`` only.

        The discriminator runs with detached copies of its parameters (same values,
        no autograd link), so this loss never moves the discriminator.
        """
        self._check_size(fake)
        frozen = {name: parameter.detach() for name, parameter in self.discriminator.named_parameters()}
        logits = functional_call(self.discriminator, frozen, (fake,))[-1]
        return self.criterion(logits, target_is_real=True, for_discriminator=False)

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Hinge discriminator loss (0-d) on ``real`` and ``fake.detach()``: moves only the discriminator."""
        real_loss = self.criterion(self.logits(real.detach()), target_is_real=True, for_discriminator=True)
        fake_loss = self.criterion(self.logits(fake.detach()), target_is_real=False, for_discriminator=True)
        return 0.5 * (real_loss + fake_loss)

    def adaptive_weight(
        self, rec_loss: torch.Tensor, gen_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """VQGAN's adaptive weight (0-d, detached, float32) times ``weight``.

        ``||d rec_loss / d last_layer|| / (||d gen_loss / d last_layer|| + 1e-4)``, clamped
        to [0, 1e4]. Both gradients come from ``torch.autograd.grad(..., retain_graph=True)``,
        so the graph is still there for the step's backward. With ``adaptive=False`` the
        result is ``weight``. Without a graph to differentiate (validation under
        ``torch.no_grad``) the ratio cannot be measured and the result is 0, as in VQGAN.
        """
        device = last_layer.device
        if not self.adaptive:
            return torch.tensor(self.weight, dtype=torch.float32, device=device)
        if not (torch.is_grad_enabled() and rec_loss.requires_grad and gen_loss.requires_grad):
            return torch.zeros((), dtype=torch.float32, device=device)
        (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
        (gen_grad,) = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)
        ratio = torch.linalg.vector_norm(rec_grad.float()) / (torch.linalg.vector_norm(gen_grad.float()) + ADAPTIVE_EPS)
        return torch.clamp(ratio, 0.0, ADAPTIVE_MAX).detach() * self.weight

    def losses(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        rec_loss: torch.Tensor,
        last_layer: torch.Tensor,
        step: int,
    ) -> dict[str, torch.Tensor]:
        """The adversarial parts of one training step, to be added to the loss.

        Args:
            real: images (B, C, *S).
            fake: reconstructions (B, C, *S), attached to the autoencoder's graph.
            rec_loss: the reconstruction loss (0-d) the adaptive weight balances against.
            last_layer: the decoder's last weight (``LatentAutoencoder.last_layer_weight()``).
            step: the training step.

        Returns ``{"generator": lam * L_gen, "discriminator": L_D, "adaptive_weight": lam}``
        (0-d float32 tensors); all zeros before ``start_step``. Summing ``generator`` and
        ``discriminator`` into the step's loss trains each network on its own objective.
        """
        if not self.active(step):
            zero = torch.zeros((), dtype=torch.float32, device=fake.device)
            return {"generator": zero, "discriminator": zero.clone(), "adaptive_weight": zero.clone()}
        gen_loss = self.generator_loss(fake).float()
        lam = self.adaptive_weight(rec_loss, gen_loss, last_layer)
        return {
            "generator": lam * gen_loss,
            "discriminator": self.discriminator_loss(real, fake).float(),
            "adaptive_weight": lam,
        }
