"""Backbone stages and the partly frozen classifier: exactly the named parts train."""

from __future__ import annotations

import copy

import pytest
import torch

from chestssl.ablations.parts import PartlyFrozenTask, encoder_stages
from chestssl.models.backbones import build_backbone, export_encoder
from chestssl.models.seeding import seeded
from chestssl.tasks import build_task
from tiny_configs import CNN_ATTENTION, SWIN

RESNET = {"name": "resnet18", "spatial_dims": 2, "block_inplanes": [4, 8, 8, 16]}
VIT = {"name": "vit", "spatial_dims": 2, "img_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
       "num_heads": 2, "mlp_dim": 64}
UNET = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}
BACKBONES = {"resnet18": RESNET, "vit": VIT, "unet_encoder": UNET, "cnn_attention": CNN_ATTENTION, "swin": SWIN}
SIZES = {"resnet18": 32, "vit": 32, "unet_encoder": 32, "cnn_attention": 32, "swin": 64}


def _task(name: str, seed: int = 0):
    with seeded(seed):
        encoder = build_backbone(BACKBONES[name])
    run = {"task": "cls", "arch": "linear", "init": "m", "class_weights": [1.0, 1.0]}
    return build_task(run, export_encoder(encoder, BACKBONES[name]), seed=seed)


def _batch(name: str, n: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    size = SIZES[name]
    return {"image": torch.rand((n, 1, size, size), generator=generator), "label": torch.tensor([0, 1] * (n // 2))}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_stages_hold_every_parameter_and_buffer_once(name):
    encoder = build_backbone(BACKBONES[name])
    stages = encoder_stages(encoder)
    assert len({stage.name for stage in stages}) == len(stages) >= 2
    keys = [key for key, _ in encoder.named_parameters()] + [key for key, _ in encoder.named_buffers()]
    for key in keys:
        owners = [stage.name for stage in stages if stage.owns(key)]
        assert len(owners) == 1, f"{key} belongs to {owners}"
    assert all(any(stage.owns(key) for key in keys) for stage in stages), "a stage owns nothing"


def test_resnet_stage_names():
    assert [s.name for s in encoder_stages(build_backbone(RESNET))] == ["stem", "layer1", "layer2", "layer3", "layer4"]


def _gradients(model, name):
    model.train()
    model.training_step(_batch(name))["loss"].backward()
    task = model.task if isinstance(model, PartlyFrozenTask) else model
    return {key: p.grad for key, p in task.named_parameters()}


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("unfrozen", [0, 1, 2])
def test_exactly_the_named_parts_receive_gradients(name, unfrozen):
    # Parameters that take no part in the forward pass (MONAI's unused cross-attention norm in
    # ViT blocks) get no gradient even when everything trains; compare against that.
    reference = {key: grad is not None for key, grad in _gradients(_task(name), name).items()}
    model = PartlyFrozenTask(_task(name), unfrozen)
    stages = encoder_stages(model.task.network.encoder)
    trained = {stage.name for stage in stages[len(stages) - unfrozen:]} if unfrozen else set()
    assert set(model.trained_stages) == trained
    gradients = _gradients(model, name)
    stage_of = {key: next(s.name for s in stages if s.owns(key.removeprefix("network.encoder.")))
                for key in gradients if key.startswith("network.encoder.")}
    for key, grad in gradients.items():
        expected = reference[key] and (key not in stage_of or stage_of[key] in trained)
        assert (grad is not None) == expected, f"{key} ({stage_of.get(key, 'head')}): gradient {grad is not None}"
        if key not in stage_of:
            assert grad.abs().sum() > 0, f"head parameter {key} got a zero gradient"
    # Each trained encoder stage does receive a non-zero gradient somewhere.
    for stage in trained:
        assert any(grad is not None and grad.abs().sum() > 0 for key, grad in gradients.items()
                   if stage_of.get(key) == stage), f"stage {stage} got no gradient"


def test_head_only_counts_and_all_stages_train_everything():
    task = _task("resnet18")
    total = sum(p.numel() for p in task.parameters())
    head = sum(p.numel() for p in task.network.fc.parameters()) if hasattr(task.network, "fc") else None
    everything = PartlyFrozenTask(_task("resnet18"), 5)
    assert sum(p.numel() for p in everything.parameters() if p.requires_grad) == total
    head_only = PartlyFrozenTask(task, 0)
    trainable = head_only.trainable_parameter_names()
    assert trainable and all(not key.startswith("network.encoder.") for key in trainable)
    if head is not None:
        assert sum(p.numel() for p in head_only.parameters() if p.requires_grad) == head


def test_frozen_stages_do_not_change_in_a_training_step():
    """An optimiser step moves the trained stages only; frozen batch-norm statistics stay put."""
    model = PartlyFrozenTask(_task("resnet18"), 1)  # head + layer4
    before = copy.deepcopy(model.task.network.encoder.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert not model.task.network.encoder.layer1.training and model.task.network.encoder.layer4.training
    model.training_step(_batch("resnet18"))["loss"].backward()
    optimizer.step()
    after = model.task.network.encoder.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith("layer4."):
            continue
        assert not changed, f"frozen {key} changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("layer4.") and "weight" in k)


def test_bad_counts_are_refused_with_the_stage_names():
    with pytest.raises(ValueError, match="stem, layer1, layer2, layer3, layer4"):
        PartlyFrozenTask(_task("resnet18"), 6)
    with pytest.raises(ValueError, match="expected an integer"):
        PartlyFrozenTask(_task("resnet18"), -1)
