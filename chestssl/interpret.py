"""Grad-CAM maps of a classifier's logit on its encoder's deepest spatial map.

Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV 2017 (arXiv:1610.02391). For a class score ``y`` and
the ``C`` feature maps ``A`` of a convolutional layer, each channel is weighted by the
spatial mean of ``dy/dA`` and the map is ``ReLU(sum_c w_c A_c)``, upsampled to the
image. The algorithm is MONAI's :class:`monai.visualize.GradCAM`; this module chooses the
layer for each backbone, runs it on a copy of the model and scales each map to [0, 1].

Target layers (relative to a :class:`chestssl.tasks.ClassificationTask`, whose
``network.encoder`` is the fine-tuned backbone); each is the module whose output is the
encoder's latent, the map both classification heads read:

==============  ==================================  ==========================================
backbone        target layer                        its output for a 64x64 slice
==============  ==================================  ==========================================
unet_encoder    ``network.encoder.conv_4_0``        (B, features[4], 4, 4)
cnn_attention   ``network.encoder.blocks.<last>``   (B, latent_channels, 64 / latent_stride, ...)
                (the convolution to the latent)
swin            ``network.encoder.layers4.0``       (B, 16 * feature_size, 2, 2), before the
                (the last Swin stage)               parameter-free layer norm of ``latent``
resnet18/50     ``network.encoder.layer4``          (B, latent_channels, 2, 2)
vit             none                                tokens (B, 1 + N, hidden), not a map
==============  ==================================  ==========================================

The radiograph classifiers (:class:`chestssl.tasks.radiograph_cls.RadiographClassificationTask`)
are covered too: ``arch: linear`` holds one of the backbones above as ``network.encoder``;
``arch: densenet121`` is MONAI's ``DenseNet121`` as a whole, whose map is
``network.class_layers.relu``: the last dense block, normalised and rectified, which its
classifier pools (the in-place ReLU itself, since a hooked map may not be modified in place).

``vit`` is not supported: every transformer block outputs tokens (B, 1 + N, hidden), and
MONAI's ``GradCAM`` reads the hooked output as (B, C, *spatial) with no way to reshape
tokens into a grid first. Even reshaped, the last block's patch tokens would get a zero
gradient, since the linear head reads the CLS token only after a per-token layer norm.
"""

from __future__ import annotations

import copy
import numbers
import os
from typing import Callable

import numpy as np
import torch
from monai.transforms import ScaleIntensity
from monai.utils import convert_to_tensor
from monai.visualize import GradCAM
from torch import nn

from chestssl.eval.examples import load_examples, save_examples
from chestssl.models.backbones import backbone_name
from chestssl.tasks.cls import classifier_encoder

#: Why Grad-CAM is not offered for a backbone, by ``backbone.name``.
GRADCAM_UNSUPPORTED: dict[str, str] = {
    "vit": (
        "Grad-CAM needs a spatial map; not available for vit (its blocks output tokens (B, 1 + N, hidden), "
        "and the linear head reads only the CLS token)"
    ),
}

#: The encoder submodule (relative to the encoder) whose output is its latent map, by ``backbone.name``.
_LATENT_LAYER: dict[str, Callable[[nn.Module], str]] = {
    "unet_encoder": lambda encoder: "conv_4_0",
    "cnn_attention": lambda encoder: f"blocks.{len(encoder.blocks) - 1}",
    "swin": lambda encoder: "layers4.0",
    "resnet18": lambda encoder: "layer4",
    "resnet50": lambda encoder: "layer4",
}

#: The class whose logit the cls task's maps explain (1 = nodule slice).
NODULE_CLASS = 1
#: Images per Grad-CAM forward/backward pass in :func:`gradcam_maps`.
DEFAULT_BATCH_SIZE = 16


#: The layer of a whole-network MONAI DenseNet classifier whose output its head pools.
DENSENET_LAYER = "network.class_layers.relu"


def _classifier_encoder(task_model: nn.Module) -> nn.Module:
    return classifier_encoder(task_model)[1]


def _densenet(task_model: nn.Module) -> nn.Module | None:
    """The task's network when it is a MONAI DenseNet, else None."""
    from monai.networks.nets import DenseNet

    network = getattr(task_model, "network", None)
    return network if isinstance(network, DenseNet) else None


def _input_layout(task_model: nn.Module) -> tuple[int, int]:
    """(spatial dims, input channels) of the images ``task_model`` takes."""
    densenet = _densenet(task_model)
    if densenet is not None:
        first = densenet.features.conv0
        return len(first.kernel_size), int(first.in_channels)
    encoder = _classifier_encoder(task_model)
    return int(encoder.spatial_dims), int(encoder.in_channels)


def gradcam_unavailable_reason(task_model: nn.Module) -> str | None:
    """Why :func:`gradcam_maps` cannot run on ``task_model``, or None when it can."""
    if _densenet(task_model) is not None:
        return None
    return GRADCAM_UNSUPPORTED.get(backbone_name(_classifier_encoder(task_model)))


def gradcam_target_layer(task_model: nn.Module) -> str | None:
    """Dotted name, relative to ``task_model``, of the module whose output is its encoder's latent map.

    E.g. ``"network.encoder.layer4"`` for a ResNet backbone (see the module docstring for
    every backbone). None for backbones without a spatial map (``vit``;
    :func:`gradcam_unavailable_reason` says why).

    Raises:
        TypeError: ``task_model`` has no ``network.encoder``, or the encoder is not a
            backbone of :mod:`chestssl.models.backbones`.
    """
    if _densenet(task_model) is not None:
        return DENSENET_LAYER
    encoder = _classifier_encoder(task_model)
    name = backbone_name(encoder)
    if name in GRADCAM_UNSUPPORTED:
        return None
    return f"network.encoder.{_LATENT_LAYER[name](encoder)}"


def _scale_each_map_to_unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of (B, 1, *S) to [0, 1]; a constant map becomes all 0.

    Replaces MONAI's ``default_normalizer``, which maps (min, max) to (1, 0) and so would
    show the least important regions brightest.
    """
    scale = ScaleIntensity(minv=0.0, maxv=1.0)
    return torch.stack([convert_to_tensor(scale(single_map), track_meta=False) for single_map in maps.detach()])


def gradcam_maps(
    task_model: nn.Module,
    images: torch.Tensor | np.ndarray,
    class_index: int = NODULE_CLASS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of logit ``class_index`` for each image.

    MONAI's :class:`~monai.visualize.GradCAM` on :func:`gradcam_target_layer`, in eval
    mode, with MONAI's (bi/tri)linear upsampling to the input size; each map is then
    min-max scaled to [0, 1] on its own. A constant map becomes 0 everywhere: where no
    channel raises the logit, or where the target layer's map is a single element (e.g. a
    ResNet's ``layer4`` on a 32x32 slice, which carries no location).

    MONAI registers its hooks for good, switches off ``inplace`` in the target layer and
    zeroes the gradients of the model it is given, so it runs on a deep copy whose
    parameters take no gradient: ``task_model`` itself (its weights, ``.grad``, hooks
    and training mode) is left exactly as it was.

    Args:
        task_model: a :class:`chestssl.tasks.ClassificationTask` (``forward(image) ->
            logits (B, num_classes)``); its device is used.
        images: (K, in_channels, *S) float, ``S`` the 2D (H, W) or 3D (D, H, W) size the
            encoder takes (e.g. the ``image`` array of an evaluate stage's ``examples.npz``).
        class_index: the logit explained; 1 is "nodule" for the cls task.
        batch_size: images per forward/backward pass.

    Returns:
        (K, 1, *S) float32 maps in [0, 1].

    Raises:
        ValueError: unsupported backbone (``vit``), images of the wrong shape, or
            ``class_index`` / ``batch_size`` out of range.
    """
    reason = gradcam_unavailable_reason(task_model)
    if reason is not None:
        raise ValueError(f"gradcam_maps: {reason}; check gradcam_target_layer(model) is not None before calling")
    target_layer = gradcam_target_layer(task_model)
    images = torch.as_tensor(images)
    spatial_dims, in_channels = _input_layout(task_model)
    if images.ndim != spatial_dims + 2 or images.shape[1] != in_channels or images.shape[0] == 0:
        raise ValueError(
            f"gradcam_maps: images must be (K, {in_channels}, *S) with K >= 1 and {spatial_dims} spatial sizes "
            f"(the encoder's spatial_dims), got shape {tuple(images.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"gradcam_maps: batch_size must be a positive integer, got {batch_size!r}")

    parameter = next(task_model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    model_copy = copy.deepcopy(task_model).to(device).eval().requires_grad_(False)
    with torch.no_grad():
        logits = model_copy(images[:1].to(device=device, dtype=torch.float32))
    num_classes = logits.shape[-1]
    if isinstance(class_index, bool) or not isinstance(class_index, numbers.Integral) or not 0 <= class_index < num_classes:
        raise ValueError(
            f"gradcam_maps: class_index must be an integer in [0, {num_classes - 1}] for logits of shape "
            f"{tuple(logits.shape)}, got {class_index!r}"
        )
    with torch.enable_grad():
        cam = GradCAM(model_copy, target_layers=target_layer, postprocessing=_scale_each_map_to_unit_range)
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            # The parameters take no gradient, so the input must: it carries the graph to the target layer.
            batch = images[start : start + batch_size].to(device=device, dtype=torch.float32).requires_grad_(True)
            chunks.append(cam(batch, class_idx=int(class_index)).detach().float().cpu())
    maps = torch.cat(chunks).numpy().astype(np.float32)
    return np.clip(maps, 0.0, 1.0)


def gradcam_maps_per_image(task_model: nn.Module, images: torch.Tensor | np.ndarray,
                           class_indices: np.ndarray | list[int], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """:func:`gradcam_maps` with its own logit per image: ``class_indices`` (K,) ints, e.g. each
    radiograph's most probable label. Returns (K, 1, *S) float32 maps in [0, 1], in image order."""
    images = torch.as_tensor(images)
    class_indices = np.asarray(class_indices, dtype=np.int64).reshape(-1)
    if class_indices.shape[0] != images.shape[0]:
        raise ValueError(f"gradcam_maps_per_image: {images.shape[0]} images but {class_indices.shape[0]} "
                         "class indices; give one per image")
    maps: np.ndarray | None = None
    # MONAI's GradCAM takes one class_idx per call, for the whole batch: one call per class
    # present, each on the images that ask for it, then put back in image order.
    for index in np.unique(class_indices):
        chosen = np.flatnonzero(class_indices == index)
        part = gradcam_maps(task_model, images[torch.from_numpy(chosen)], class_index=int(index),
                            batch_size=batch_size)
        if maps is None:
            maps = np.zeros((images.shape[0], *part.shape[1:]), dtype=np.float32)
        maps[chosen] = part
    if maps is None:
        raise ValueError("gradcam_maps_per_image: no images")
    return maps


def add_gradcam_to_examples(task_model: nn.Module, examples_path: str | os.PathLike) -> None:
    """Add the Grad-CAM maps of the classification examples to their ``examples.npz``.

    Reads the ``image`` array (K, 1, *S) written by :func:`chestssl.eval.downstream.evaluate_predictor`
    and rewrites the file (atomically, :func:`chestssl.eval.examples.save_examples`) with one
    more array: ``cam``, (K, 1, *S) float16 in [0, 1], the :func:`gradcam_maps` of the
    nodule logit (class 1); or, for a backbone without a spatial map, ``cam_unavailable``,
    (K,) str, the reason repeated per example, which the report's Grad-CAM figure shows.

    Raises:
        FileNotFoundError: no file at ``examples_path``.
        ValueError: the file holds no ``image`` array.
    """
    arrays = load_examples(examples_path)
    if "image" not in arrays:
        raise ValueError(
            f"{examples_path} has no 'image' array (it holds {', '.join(sorted(arrays))}); rerun the evaluate "
            "stage of this classification run, which saves image, label, score, patient_id and slice_index"
        )
    arrays.pop("cam", None)
    arrays.pop("cam_unavailable", None)
    count = arrays["image"].shape[0]
    reason = gradcam_unavailable_reason(task_model)
    if reason is None:
        arrays["cam"] = gradcam_maps(task_model, arrays["image"], class_index=NODULE_CLASS).astype(np.float16)
    else:
        arrays["cam_unavailable"] = np.full(count, reason)
    save_examples(examples_path, **arrays)
