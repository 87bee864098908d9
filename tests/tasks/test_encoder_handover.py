"""Encoder hand-over: a downstream network starts from exactly the weights a pretext method exported.

The path of the pipeline: ``pretrain@<method>`` writes ``method.export()`` to a file,
``finetune@<run>`` reads it and calls ``build_task(run, payload, seed, name)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chestssl.model_files import load_model_file, save_model_file
from chestssl.methods import PretrainMethod, build_method
from chestssl.tasks import ClassificationTask, SegmentationTask, build_task
from tiny_configs import CNN_ATTENTION, DECODER, LOSS, QUANTIZER, SWIN

SIZE = {"cnn_attention": 32, "swin": 64}
METHOD_SEED, TASK_SEED = 3, 5


def _vqgan(backbone: dict) -> dict:
    return {
        "method": "vqgan",
        "backbone": copy.deepcopy(backbone),
        "decoder": dict(DECODER),
        "quantizer": dict(QUANTIZER),
        "loss": dict(LOSS),
    }


def _multihead() -> dict:
    return {
        **_vqgan(SWIN),
        "method": "multihead",
        "heads": ["seg", "cls"],
        "seg_beta": 1.0,
        "cls_weight": 1.0,
        "seg_loss": "dice",
        "seg_class_weights": [1.0, 50.0],
        "focal_gamma": 2.0,
        "focal_alpha": 0.25,
        "cls_arch": "resnet18",
        "cls_class_weights": [1.0, 1.0],
    }


def _seg_run(arch: str, init: str) -> dict:
    return {
        "task": "seg", "arch": arch, "init": init, "loss": "ce", "class_weights": [1.0, 50.0],
        "focal_gamma": 2.0, "focal_alpha": 0.25,
    }


def _cls_run(arch: str, init: str) -> dict:
    return {"task": "cls", "arch": arch, "init": init, "class_weights": [1.0, 1.0]}


def _batch(size: int) -> dict:
    image = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    mask = (image > 0.8).float()
    return {"image": image, "mask": mask, "label": torch.tensor([1, 0])}


def _pretrained(name: str, cfg: dict, steps: int = 2) -> PretrainMethod:
    """The method after a few optimiser steps, so its encoder is no longer the seeded initialisation."""
    method = build_method(name, cfg, seed=METHOD_SEED).train()
    initial = copy.deepcopy(method.encoder().state_dict())
    optimiser = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(SIZE[cfg["backbone"]["name"]])
    for _ in range(steps):
        loss = method.training_step(batch)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert not _equal_states(method.encoder().state_dict(), initial), "pretraining left the encoder unchanged"
    return method.eval()


def _handed_over(method: PretrainMethod, run: dict, run_name: str, tmp_path) -> nn.Module:
    """``build_task`` on the exported encoder, read back from a file as ``finetune`` does."""
    path = tmp_path / "encoder.pt"
    save_model_file(path, method.export())
    payload = load_model_file(path, "pretrain@test")
    return build_task(run, payload, TASK_SEED, run_name)


def _equal_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)


def _assert_copied(got: nn.Module, want: nn.Module) -> None:
    """Same weights, own storage: fine-tuning the downstream network leaves the pretrained encoder alone."""
    assert _equal_states(got.state_dict(), want.state_dict())
    pretrained = {p.data_ptr() for p in want.parameters()}
    assert not any(p.data_ptr() in pretrained for p in got.parameters())


def test_vqgan_cnn_attention_to_unetpp(tmp_path):
    method = _pretrained("ae_cnn_attention", _vqgan(CNN_ATTENTION))
    task = _handed_over(method, _seg_run("unetpp", "ae_cnn_attention"), "seg_unetpp", tmp_path)
    assert isinstance(task, SegmentationTask)
    encoder = method.encoder()
    stages = encoder.stages()
    assert len(stages) == 2
    for level, stage in enumerate(stages):
        _assert_copied(getattr(task.network, f"conv_{level}_0"), stage)
    # The UNet++'s shallow down path computes the encoder's maps.
    image = _batch(32)["image"]
    task.eval()
    with torch.no_grad():
        expected = encoder.feature_maps(image)
        got = task.encoder_feature_maps(image)
    for level in range(len(stages)):
        torch.testing.assert_close(got[level], expected[level])
    assert tuple(task(image).shape) == (2, 2, 32, 32)


def test_vqgan_swin_to_swin_unetr(tmp_path):
    method = _pretrained("ae_swin", _vqgan(SWIN))
    task = _handed_over(method, _seg_run("swin_unetr", "ae_swin"), "seg_swinunetr", tmp_path)
    assert isinstance(task, SegmentationTask)
    _assert_copied(task.network.swinViT, method.encoder())
    image = _batch(64)["image"]
    task.eval()
    with torch.no_grad():
        for got, want in zip(task.encoder_feature_maps(image), method.encoder().feature_maps(image)):
            torch.testing.assert_close(got, want)
    assert tuple(task(image).shape) == (2, 2, 64, 64)


def test_vqgan_swin_to_resnet18_classifier(tmp_path):
    method = _pretrained("ae_swin", _vqgan(SWIN))
    task = _handed_over(method, _cls_run("resnet18", "ae_swin"), "cls_resnet18", tmp_path)
    assert isinstance(task, ClassificationTask)
    _assert_copied(task.network.encoder, method.encoder())
    image = _batch(64)["image"]
    with torch.no_grad():
        torch.testing.assert_close(task.network.encoder.latent(image), method.encoder().latent(image))
    assert tuple(task.eval()(image).shape) == (2, 2)


def test_multihead_to_swin_unetr(tmp_path):
    method = _pretrained("multihead_clsseg", _multihead())
    task = _handed_over(method, _seg_run("swin_unetr", "multihead_clsseg"), "seg_swinunetr_multihead", tmp_path)
    assert isinstance(task, SegmentationTask)
    _assert_copied(task.network.swinViT, method.encoder())
    # Only the encoder is handed over: the decoder is SwinUNETR's own, seeded by the run.
    decoder = task.network.decoder1.state_dict()
    head = method.seg_head.decoder1.state_dict()
    assert decoder.keys() == head.keys() and not _equal_states(decoder, head)


@pytest.mark.parametrize(
    "backbone,arch,allowed",
    [(SWIN, "unetpp", "'unet_encoder', 'cnn_attention'"), (CNN_ATTENTION, "swin_unetr", "'swin'")],
    ids=["unetpp_on_swin", "swin_unetr_on_cnn_attention"],
)
def test_arch_that_does_not_fit_the_backbone_is_refused(backbone, arch, allowed):
    init = f"scratch_{backbone['name']}"
    payload = build_method(init, {"method": "scratch", "backbone": copy.deepcopy(backbone)}, seed=0).export()
    message = rf"seg_mismatch: arch '{arch}' needs a backbone of {allowed}, got a '{backbone['name']}' encoder"
    with pytest.raises(ValueError, match=message):
        build_task(_seg_run(arch, init), payload, TASK_SEED, "seg_mismatch")
