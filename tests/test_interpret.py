"""Grad-CAM of the classification task (chestssl.interpret)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from chestssl.eval.examples import load_examples, save_examples
from chestssl.interpret import (
    DENSENET_LAYER,
    add_gradcam_to_examples,
    gradcam_maps,
    gradcam_maps_per_image,
    gradcam_target_layer,
    gradcam_unavailable_reason,
)
from chestssl.methods import build_method
from chestssl.tasks import build_task
from tiny_configs import CNN_ATTENTION, SWIN

UNET = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}
RESNET18 = {"name": "resnet18", "spatial_dims": 2, "block_inplanes": [4, 4, 8, 8]}
RESNET50 = {"name": "resnet50", "spatial_dims": 2, "block_inplanes": [4, 4, 8, 8]}
VIT = {"name": "vit", "spatial_dims": 2, "img_size": 32, "patch_size": 8, "hidden_size": 16, "num_layers": 1,
       "num_heads": 2, "mlp_dim": 16}


def _task(backbone: dict, arch: str = "linear", seed: int = 0):
    payload = build_method("scratch", {"method": "scratch", "backbone": backbone}, seed=seed).export()
    return build_task({"task": "cls", "arch": arch, "init": "scratch", "class_weights": [1.0, 1.0]}, payload, seed=0)


def _hooked_output(model: nn.Module, layer: str, image: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with torch.no_grad():
            model(image)
    finally:
        handle.remove()
    assert len(captured) == 1, f"{layer} ran {len(captured)} times in one forward pass"
    return captured[0]


@pytest.mark.parametrize(
    "backbone,arch,size,expected",
    [
        (UNET, "linear", 64, "network.encoder.conv_4_0"),
        (UNET, "resnet18", 64, "network.encoder.conv_4_0"),
        (CNN_ATTENTION, "linear", 32, "network.encoder.blocks.9"),
        (CNN_ATTENTION, "resnet50", 32, "network.encoder.blocks.9"),
        (SWIN, "linear", 64, "network.encoder.layers4.0"),
        (SWIN, "resnet18", 64, "network.encoder.layers4.0"),
        (RESNET18, "linear", 64, "network.encoder.layer4"),
        (RESNET50, "linear", 64, "network.encoder.layer4"),
    ],
    ids=["unet-linear", "unet-resnet18", "cnn_attention-linear", "cnn_attention-resnet50", "swin-linear",
         "swin-resnet18", "resnet18-linear", "resnet50-linear"],
)
def test_target_layer_outputs_the_encoders_latent_map(backbone, arch, size, expected):
    task = _task(backbone, arch).eval()
    layer = gradcam_target_layer(task)
    assert layer == expected
    assert gradcam_unavailable_reason(task) is None
    image = torch.rand(2, 1, size, size)
    output = _hooked_output(task, layer, image)
    encoder = task.network.encoder
    with torch.no_grad():
        latent = encoder.latent(image)
    assert output.ndim == 4 and output.shape[0] == 2
    if backbone is SWIN:
        # The last Swin stage, before the parameter-free layer norm that makes the latent.
        torch.testing.assert_close(encoder.proj_out(output, True), latent)
    else:
        torch.testing.assert_close(output, latent)


@pytest.mark.parametrize(
    "backbone,arch,size",
    [(UNET, "linear", 32), (UNET, "resnet18", 32), (CNN_ATTENTION, "linear", 32), (CNN_ATTENTION, "resnet50", 32),
     (SWIN, "linear", 64), (SWIN, "resnet18", 64), (RESNET18, "linear", 64), (RESNET50, "linear", 64)],
    ids=["unet-linear", "unet-resnet18", "cnn_attention-linear", "cnn_attention-resnet50", "swin-linear",
         "swin-resnet18", "resnet18-linear", "resnet50-linear"],
)
def test_maps_have_the_input_size_lie_in_unit_range_and_depend_on_the_input(backbone, arch, size):
    task = _task(backbone, arch)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, size, size, generator=generator)
    images[1] = torch.rand(1, size, size, generator=generator) ** 4  # a differently distributed image
    maps = gradcam_maps(task, images)
    assert maps.shape == (3, 1, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    for k in range(3):
        # Each map is scaled on its own to reach 1, unless no channel raises the logit anywhere (all 0).
        assert maps[k].max() in (pytest.approx(0.0), pytest.approx(1.0)), f"map {k} peaks at {maps[k].max()}"
    differing = [(i, j) for i in range(3) for j in range(i + 1, 3) if not np.allclose(maps[i], maps[j], atol=1e-3)]
    assert len(differing) >= 2, "the maps of different images should differ"


def _region_reading_task(sign: float):
    """UNet encoder whose convolutions all average their inputs, so every latent channel is a
    smoothed, standardised copy of the image, and a linear head whose logit 1 is ``sign`` times
    the mean latent (logit 0 is 0): logit 1 reads how bright the image is, everywhere alike."""
    task = _task(UNET)
    with torch.no_grad():
        for module in task.network.encoder.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                module.bias.zero_()
        task.network.head.weight.zero_()
        task.network.head.weight[1] = sign
        task.network.head.bias.zero_()
    return task


def _bright_square_images() -> tuple[torch.Tensor, list[tuple[slice, slice]]]:
    images = torch.full((2, 1, 64, 64), 0.2)
    squares = [(slice(8, 24), slice(8, 24)), (slice(40, 56), slice(36, 52))]
    for k, (rows, columns) in enumerate(squares):
        images[k, 0, rows, columns] = 0.9
    return images, squares


def test_map_peaks_on_the_region_that_raises_the_logit():
    images, squares = _bright_square_images()
    maps = gradcam_maps(_region_reading_task(sign=1.0), images, class_index=1)
    for k, (rows, columns) in enumerate(squares):
        inside = np.zeros((64, 64), bool)
        inside[rows, columns] = True
        peak = np.unravel_index(int(maps[k, 0].argmax()), (64, 64))
        assert inside[peak], f"image {k}: the map peaks at {peak}, outside the bright square"
        inside_mean, outside_mean = maps[k, 0][inside].mean(), maps[k, 0][~inside].mean()
        assert inside_mean > 0.6 and inside_mean > 3 * outside_mean, (inside_mean, outside_mean)
    # The same square seen by a logit that falls with brightness: the map moves off the square.
    darkness = gradcam_maps(_region_reading_task(sign=-1.0), images, class_index=1)
    rows, columns = squares[0]
    assert darkness[0, 0, rows, columns].mean() < 0.1 < darkness[0, 0].mean()


def test_class_index_selects_the_logit_explained():
    images, _ = _bright_square_images()
    task = _region_reading_task(sign=1.0)
    # Logit 0 is constant (zero weights): no channel raises it, so its map is 0 everywhere.
    assert np.all(gradcam_maps(task, images, class_index=0) == 0.0)
    assert gradcam_maps(task, images, class_index=1).max() == pytest.approx(1.0)


def test_each_image_can_explain_its_own_logit():
    images, _ = _bright_square_images()
    task = _region_reading_task(sign=1.0)
    classes = [1, 0] * (images.shape[0] // 2) + [1] * (images.shape[0] % 2)
    maps = gradcam_maps_per_image(task, images, classes)
    for index, chosen in enumerate(classes):
        np.testing.assert_array_equal(maps[index], gradcam_maps(task, images[index:index + 1], class_index=chosen)[0])
    with pytest.raises(ValueError, match="give one per image"):
        gradcam_maps_per_image(task, images, [1])


def test_a_densenet_radiograph_classifier_is_explained_on_its_last_dense_block():
    from chestssl.tasks.radiograph_cls import RadiographClassificationTask

    task = RadiographClassificationTask("cxr", {"mode": "multilabel", "arch": "densenet121"}, ["a", "b", "c"], seed=0)
    assert gradcam_unavailable_reason(task) is None and gradcam_target_layer(task) == DENSENET_LAYER
    image = torch.rand(2, 1, 32, 32)
    assert _hooked_output(task.eval(), DENSENET_LAYER, image).shape[-2:] == (1, 1)  # 32 / 32
    maps = gradcam_maps(task, torch.rand(2, 1, 64, 64), class_index=2)
    assert maps.shape == (2, 1, 64, 64) and 0.0 <= maps.min() and maps.max() <= 1.0
    with pytest.raises(ValueError, match=r"images must be \(K, 1, \*S\)"):
        gradcam_maps(task, torch.rand(2, 3, 64, 64))


def test_model_is_left_as_it_was():
    task = _task(UNET, "resnet18").train()
    task.network.head.fc.requires_grad_(False)
    sentinel = {name: torch.full_like(parameter, 0.5) for name, parameter in task.named_parameters()
                if name.endswith("conv_0.conv.weight")}
    for name, parameter in task.named_parameters():
        parameter.grad = sentinel.get(name)
    before = {key: value.clone() for key, value in task.state_dict().items()}
    requires_grad = {name: p.requires_grad for name, p in task.named_parameters()}
    gradcam_maps(task, torch.rand(2, 1, 32, 32))
    assert task.training and all(module.training for module in task.modules())
    for name, parameter in task.named_parameters():
        if name in sentinel:
            assert torch.equal(parameter.grad, sentinel[name]), name
        else:
            assert parameter.grad is None, f"{name} was given a gradient"
        assert parameter.requires_grad == requires_grad[name], name
    for key, value in task.state_dict().items():
        assert torch.equal(value, before[key]), key
    layer = task.get_submodule(gradcam_target_layer(task))
    assert not layer._forward_hooks and not layer._backward_hooks
    # Under no_grad, as an evaluate loop may call it, the maps are the same.
    task.eval()
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        inside_no_grad = gradcam_maps(task, images)
    np.testing.assert_allclose(inside_no_grad, gradcam_maps(task, images), atol=1e-6)


def test_batches_give_the_same_maps_and_numpy_float16_is_accepted():
    task = _task(CNN_ATTENTION)
    images = torch.rand(5, 1, 32, 32)
    whole = gradcam_maps(task, images)
    np.testing.assert_allclose(gradcam_maps(task, images, batch_size=2), whole, atol=1e-5)
    half = images.numpy().astype(np.float16)
    np.testing.assert_allclose(gradcam_maps(task, half), gradcam_maps(task, torch.as_tensor(half).float()), atol=1e-6)


def test_3d_volumes_get_3d_maps():
    task = _task({**UNET, "spatial_dims": 3})
    maps = gradcam_maps(task, torch.rand(2, 1, 32, 32, 32))
    assert maps.shape == (2, 1, 32, 32, 32) and 0.0 <= maps.min() and maps.max() <= 1.0


def test_vit_has_no_target_layer_and_says_why():
    task = _task(VIT)
    assert gradcam_target_layer(task) is None
    reason = gradcam_unavailable_reason(task)
    assert "spatial map" in reason and "vit" in reason
    with pytest.raises(ValueError, match="Grad-CAM needs a spatial map; not available for vit"):
        gradcam_maps(task, torch.rand(1, 1, 32, 32))


def test_bad_inputs_are_refused_with_advice():
    task = _task(UNET)
    with pytest.raises(ValueError, match=r"images must be \(K, 1, \*S\).*got shape \(1, 32, 32\)"):
        gradcam_maps(task, torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 32, 32\)"):
        gradcam_maps(task, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"K >= 1"):
        gradcam_maps(task, torch.rand(0, 1, 32, 32))
    with pytest.raises(ValueError, match=r"class_index must be an integer in \[0, 1\].*got 2"):
        gradcam_maps(task, torch.rand(1, 1, 32, 32), class_index=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        gradcam_maps(task, torch.rand(1, 1, 32, 32), batch_size=0)
    with pytest.raises(TypeError, match="has no network.encoder; pass a ClassificationTask"):
        gradcam_target_layer(nn.Linear(2, 2))


def _save_cls_examples(path, count: int, size: int) -> dict[str, np.ndarray]:
    arrays = dict(
        image=np.random.default_rng(0).random((count, 1, size, size)).astype(np.float32),
        label=np.arange(count) % 2,
        score=np.linspace(0.9, 0.1, count),
        patient_id=np.array([f"p{k}" for k in range(count)]),
        slice_index=np.arange(count),
    )
    save_examples(path, **arrays)
    return arrays


def test_examples_gain_cam_maps(tmp_path):
    path = tmp_path / "examples.npz"
    arrays = _save_cls_examples(path, count=3, size=32)
    task = _task(UNET)
    add_gradcam_to_examples(task, path)
    saved = load_examples(path)
    assert set(saved) == {*arrays, "cam"}
    for key, value in arrays.items():
        np.testing.assert_array_equal(saved[key], value)
    assert saved["cam"].shape == (3, 1, 32, 32) and saved["cam"].dtype == np.float16
    np.testing.assert_allclose(saved["cam"], gradcam_maps(task, arrays["image"]), atol=1e-3)


def test_examples_of_a_vit_run_say_why_they_have_no_cam(tmp_path):
    path = tmp_path / "examples.npz"
    arrays = _save_cls_examples(path, count=2, size=32)
    add_gradcam_to_examples(_task(VIT), path)
    saved = load_examples(path)
    assert "cam" not in saved and set(saved) == {*arrays, "cam_unavailable"}
    assert all("not available for vit" in reason for reason in saved["cam_unavailable"])


def test_examples_without_images_are_refused(tmp_path):
    path = tmp_path / "examples.npz"
    save_examples(path, mask=np.zeros((2, 32, 32)), prob=np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match=r"has no 'image' array.*rerun the evaluate stage"):
        add_gradcam_to_examples(_task(UNET), path)


def test_maps_are_bilinear_upsamplings_of_the_layer_map():
    """From the 4x4 latent of a 64x64 slice, bilinear upsampling moves at most 1/16 of the cell
    range per pixel (cell centres are 16 pixels apart); nearest-neighbour would jump by the whole range.

    The cell centres fall between pixels (at 7.5, 23.5, ...), so the pixels reach at least 15/16 of
    the cells' range, and after scaling each map to [0, 1] a step is at most (1/16) / (15/16) = 1/15.
    """
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        maps = gradcam_maps(_task(UNET), torch.rand(2, 1, 64, 64, generator=generator))
        steps = np.abs(np.concatenate([np.diff(maps, axis=-1).ravel(), np.diff(maps, axis=-2).ravel()]))
        assert steps.max() <= 1.0 / 15 + 1e-4 and steps.max() > 0
