"""multihead: one Swin encoder shared by a reconstruction, a segmentation and a classification head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from chestssl.methods import MultiheadAutoencoder, build_method
from chestssl.params import pretrain_entry
from shipped_params import problem_starting_with, read_shipped_params, validate_with_method_configs
from tiny_configs import CNN_ATTENTION, SWIN, drop_report_rows_of_absent_entries

SIZE = 64  # SwinUNETR's decoder needs a deepest map of more than one pixel: 64 / 32 = 2.

TRAIN = {
    "epochs": 1,
    "batch_size": 4,
    "lr": 0.001,
    "weight_decay": 0.0,
    "optimizer": "adam",
    "betas": [0.5, 0.9],
    "scheduler": "none",
    "grad_clip": 1.0,
    "max_steps": 0,
    "amp": False,
    "num_workers": 0,
    "log_every": 10,
    "device": "cpu",
}


def _cfg(heads=("seg", "cls"), backbone: dict = SWIN, disc_start: int = 100, **overrides) -> dict:
    cfg = {
        "method": "multihead",
        "heads": list(heads),
        "seg_beta": 1.0,
        "cls_weight": 1.0,
        "seg_loss": "dice",
        "seg_class_weights": [1.0, 50.0],
        "focal_gamma": 2.0,
        "focal_alpha": 0.25,
        "cls_arch": "resnet18",
        "cls_class_weights": [1.0, 1.0],
        "backbone": copy.deepcopy(backbone),
        "decoder": {"channels": 4, "channel_multipliers": [1, 2], "num_res_blocks": 1, "norm_num_groups": 2,
                    "latent_channels": 4},
        "quantizer": {"enabled": True, "codebook_size": 16, "dim": 4, "beta": 0.25},
        "loss": {"l1": 1.0, "ssim": 0.0, "perceptual": 0.0, "perceptual_weights": "", "codebook": 1.0,
                 "adversarial": 0.6, "adaptive_weight": True, "disc_start": disc_start, "disc_layers": 2,
                 "disc_channels": 4},
        "train": dict(TRAIN),
    }
    cfg.update(overrides)
    return cfg


def _method(name: str = "mh_tiny", seed: int = 0, **cfg) -> MultiheadAutoencoder:
    method = build_method(name, _cfg(**cfg), seed=seed)
    assert isinstance(method, MultiheadAutoencoder)
    return method


def _batch(n: int = 2, size: int = SIZE, labels=None) -> dict:
    """Bright discs (the "nodules") on a dim background; slices 0, 2, ... hold one, 1, 3, ... none."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = torch.zeros(n, 1, size, size)
    for i in range(0, n, 2):
        centre = 20 + 6 * i
        mask[i, 0] = (((yy - centre) ** 2 + (xx - size // 2) ** 2) <= 36).float()
    noise = 0.05 * torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    image = (0.2 + 0.6 * mask + noise).clamp(0, 1)
    label = torch.tensor([1 - i % 2 for i in range(n)]) if labels is None else torch.as_tensor(labels)
    return {"image": image, "mask": mask, "label": label, "patient_id": [f"p{i}" for i in range(n)]}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state_b = b.state_dict()
    return all(torch.equal(value, state_b[key]) for key, value in a.state_dict().items())


def _step(method: MultiheadAutoencoder, batch: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same random state for both models compared
    return method.training_step(batch)


# -- shapes and heads ---------------------------------------------------------------------


def test_forward_heads_shapes():
    method = _method().eval()
    batch = _batch(3)
    with torch.no_grad():
        out = method.forward_heads(batch["image"])
    assert set(out) == {"ae", "seg", "cls"}
    assert tuple(out["ae"].recon.shape) == (3, 1, SIZE, SIZE)
    assert tuple(out["seg"].shape) == (3, 2, SIZE, SIZE)
    assert tuple(out["cls"].shape) == (3, 2)
    assert method.heads == ("seg", "cls") and method.monitor == ("val/loss", "min")


def test_predictions_shapes_and_ranges():
    method = _method().eval()
    image = _batch(2)["image"]
    segmentation = method.predict_segmentation(image)
    assert tuple(segmentation.shape) == (2, 1, SIZE, SIZE) and not segmentation.requires_grad
    assert 0.0 <= float(segmentation.min()) and float(segmentation.max()) <= 1.0
    classification = method.predict_classification(image)
    assert tuple(classification.shape) == (2,) and not classification.requires_grad
    assert bool(((classification >= 0) & (classification <= 1)).all())
    recon = method.reconstruct(image)
    assert recon.shape == image.shape and 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0


def test_seg_only_model_has_no_cls_head():
    method = _method(heads=["seg"]).train()
    assert method.heads == ("seg",) and method.seg_head is not None and method.cls_head is None
    batch = _batch(2)
    out = method.training_step(batch)
    assert "seg_loss" in out and "cls_loss" not in out
    with torch.no_grad():
        assert set(method.forward_heads(batch["image"])) == {"ae", "seg"}
    with pytest.raises(RuntimeError, match=r"multihead\.mh_tiny has no cls head"):
        method.predict_classification(batch["image"])


def test_cls_only_model_has_no_seg_head():
    method = _method(heads=["cls"]).train()
    assert method.heads == ("cls",) and method.cls_head is not None and method.seg_head is None
    batch = _batch(2)
    out = method.training_step(batch)
    assert "cls_loss" in out and "seg_loss" not in out
    out["loss"].backward()
    assert all(p.grad is not None for p in method.cls_head.parameters())
    with torch.no_grad():
        assert set(method.forward_heads(batch["image"])) == {"ae", "cls"}
    with pytest.raises(RuntimeError, match=r"multihead\.mh_tiny has no seg head"):
        method.predict_segmentation(batch["image"])


def test_cls_only_model_on_a_cnn_attention_backbone():
    method = _method(heads=["cls"], backbone=CNN_ATTENTION).train()
    batch = _batch(2, size=32)
    out = method.training_step(batch)
    assert "cls_loss" in out and "seg_loss" not in out
    out["loss"].backward()
    assert all(p.grad is not None for p in method.cls_head.parameters())
    method.eval()
    with torch.no_grad():
        logits = method.forward_heads(batch["image"])["cls"]
    torch.testing.assert_close(method.predict_classification(batch["image"]), torch.softmax(logits, dim=1)[:, 1])


def test_seg_head_needs_a_swin_backbone_of_patch_size_2():
    raw = read_shipped_params()
    raw["multihead"]["multihead_cls"]["backbone"] = "cnn_attention"  # a cls head alone takes any backbone
    validate_with_method_configs(raw)
    raw["multihead"]["multihead_seg"]["backbone"] = "cnn_attention"
    raw["backbones"]["swin_patch4"] = {**raw["backbones"]["swin"], "patch_size": 4}
    raw["multihead"]["multihead_clsseg"]["backbone"] = "swin_patch4"
    problem_starting_with(raw, "multihead.multihead_seg.backbone: the seg head is SwinUNETR's decoder and needs a "
                               "'swin' backbone, got a 'cnn_attention' one")
    problem_starting_with(raw, "multihead.multihead_clsseg.backbone: its patch_size is 4, but the seg head is "
                               "SwinUNETR's decoder, which needs 2")


@pytest.mark.parametrize(
    "heads,problem",
    [
        ([], "multihead.multihead_seg.heads: got [], expected one or both of 'seg', 'cls', each once"),
        (["seg", "seg"], "multihead.multihead_seg.heads: got ['seg', 'seg'], expected one or both of 'seg', 'cls', "
                         "each once"),
        (["seg", "box"], "multihead.multihead_seg.heads[1]: got 'box', expected one of 'seg', 'cls'"),
    ],
    ids=["empty", "duplicate", "unknown"],
)
def test_bad_heads_are_refused(heads, problem):
    raw = read_shipped_params()
    raw["multihead"]["multihead_seg"]["heads"] = heads
    problem_starting_with(raw, problem)


def test_class_weights_that_are_both_zero_are_refused_where_a_loss_reads_them():
    raw = read_shipped_params()
    raw["multihead"]["multihead_seg"]["seg_class_weights"] = [0.0, 0.0]  # its seg_loss, dice, does not read them
    validate_with_method_configs(raw)
    raw["multihead"]["multihead_seg"]["seg_loss"] = "ce"
    raw["multihead"]["multihead_seg"]["cls_class_weights"] = [0.0, 0.0]  # always read, with or without a cls head
    problem_starting_with(raw, "multihead.multihead_seg.seg_class_weights: got [0.0, 0.0], but seg_loss 'ce' weighs "
                               "each pixel by its class")
    problem_starting_with(raw, "multihead.multihead_seg.cls_class_weights: got [0.0, 0.0], expected class weights "
                               "that are not all 0")
    raw["multihead"]["multihead_seg"]["cls_class_weights"] = "equal"
    problem_starting_with(raw, "multihead.multihead_seg.cls_class_weights: got 'equal', expected 'balanced'")
    raw["multihead"]["multihead_seg"]["cls_class_weights"] = "balanced"
    raw["multihead"]["multihead_seg"]["seg_loss"] = "dice"
    validate_with_method_configs(raw)


# -- the objective ------------------------------------------------------------------------


def test_seg_beta_scales_the_seg_loss():
    batch = _batch(2)
    low, high = _method(seg_beta=1.0, disc_start=0), _method(seg_beta=3.5, disc_start=0)
    assert _same_weights(low, high)
    out_low, out_high = _step(low, batch), _step(high, batch)
    for key in ("ae_loss", "seg_loss", "cls_loss", "disc", "generator"):
        torch.testing.assert_close(out_low[key], out_high[key])
    assert float(out_low["seg_loss"]) > 0.0
    difference = out_high["loss"].detach() - out_low["loss"].detach()
    torch.testing.assert_close(difference, (3.5 - 1.0) * out_low["seg_loss"])
    # The whole sum: ae (+ its adversarial term) + beta * seg + cls_weight * cls + discriminator.
    expected = out_high["ae_loss"] + 3.5 * out_high["seg_loss"] + 1.0 * out_high["cls_loss"] + out_high["disc"]
    torch.testing.assert_close(out_high["loss"].detach(), expected)


def test_cls_weight_scales_the_cls_loss():
    batch = _batch(2)
    low, high = _method(cls_weight=0.5), _method(cls_weight=4.0)
    assert _same_weights(low, high)
    out_low, out_high = _step(low, batch), _step(high, batch)
    for key in ("ae_loss", "seg_loss", "cls_loss"):
        torch.testing.assert_close(out_low[key], out_high[key])
    assert float(out_low["cls_loss"]) > 0.0
    difference = out_high["loss"].detach() - out_low["loss"].detach()
    torch.testing.assert_close(difference, (4.0 - 0.5) * out_low["cls_loss"])


def test_zero_weights_leave_the_task_heads_without_gradient():
    method = _method(seg_beta=0.0, cls_weight=0.0)
    method.training_step(_batch(2))["loss"].backward()
    assert all(not bool(p.grad.any()) for p in method.seg_head.parameters())
    assert all(not bool(p.grad.any()) for p in method.cls_head.parameters())
    assert any(bool(p.grad.any()) for p in method.encoder().parameters())


def test_unlabelled_slices_do_not_count_in_the_cls_loss():
    method = _method(cls_class_weights=[1.0, 3.0])
    logits = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    label = torch.tensor([1, -1, 0, -1])
    expected = F.cross_entropy(logits[[0, 2]], label[[0, 2]], weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(method.cls_loss(logits, label), expected)
    # A batch with only ambiguous slices: loss 0, still in the graph, no NaN.
    only_ambiguous = method.cls_loss(logits, torch.tensor([-1, -1, -1, -1]))
    assert float(only_ambiguous.detach()) == 0.0 and only_ambiguous.requires_grad
    only_ambiguous.backward()
    assert not bool(logits.grad.any())
    # Through a whole training step.
    out = method.training_step(_batch(2, labels=[-1, -1]))
    assert float(out["cls_loss"]) == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)


# -- validation ---------------------------------------------------------------------------


def test_validation_metrics_include_dice_and_accuracy():
    method = _method(seg_beta=2.0, cls_weight=0.5).eval()
    batch = _batch(4, labels=[1, 0, -1, 0])
    step = method.validation_step(batch)
    assert {"loss", "ae_loss", "ssim", "psnr", "seg_loss", "cls_loss", "dice", "accuracy"} <= set(step)
    assert all(v.ndim == 0 and not v.requires_grad for v in step.values())
    assert 0.0 <= float(step["dice"]) <= 1.0 and -1.0 <= float(step["ssim"]) <= 1.0
    # Accuracy over the three labelled slices only.
    with torch.no_grad():
        predicted = method.forward_heads(batch["image"])["cls"].argmax(dim=1)
    expected = (predicted[[0, 1, 3]] == batch["label"][[0, 1, 3]]).float().mean()
    assert float(step["accuracy"]) == pytest.approx(float(expected))
    torch.testing.assert_close(step["loss"], step["ae_loss"] + 2.0 * step["seg_loss"] + 0.5 * step["cls_loss"])
    # No labelled slice: no accuracy rather than a NaN.
    assert "accuracy" not in method.validation_step(_batch(2, labels=[-1, -1]))
    epoch = method.validation_epoch_end()
    assert {"ssim", "psnr", "dice"} <= set(epoch) and 0.0 <= float(epoch["dice"]) <= 1.0
    method.train()
    method.eval()
    assert method.validation_epoch_end() == {}


def test_validation_dice_of_a_perfect_segmentation_is_1():
    method = _method(heads=["seg"]).eval()
    batch = _batch(2)
    method.seg_head.forward = lambda image, hidden: torch.cat(  # type: ignore[method-assign]
        [-10 * batch["mask"], 10 * batch["mask"]], dim=1
    )
    step = method.validation_step(batch)
    assert float(step["dice"]) == pytest.approx(1.0)
    assert float(method.validation_epoch_end()["dice"]) == pytest.approx(1.0)


# -- optimisation and params --------------------------------------------------------------


def test_short_optimisation_reduces_the_total_loss():
    torch.manual_seed(0)
    method = _method(seed=1).train()
    batch = _batch(4)
    optimiser = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(12):
        out = method.training_step(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(float(out["loss"].detach()))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert int(method.steps_done) == 12


def test_null_seg_beta_takes_the_top_level_value():
    raw = read_shipped_params()
    raw["seg_beta"] = 7.0
    entries = {"mh_inherit": _cfg(seg_beta=None), "mh_fixed": _cfg(seg_beta=2.0)}
    raw["backbones"]["tiny_swin"] = entries["mh_inherit"]["backbone"]
    # as params.yaml writes them: the backbone and the recipe named, the entry's own train keys over it
    raw["multihead"] = {name: {**cfg, "backbone": "tiny_swin", "recipe": "multihead", "train": cfg.get("train", {})}
                        for name, cfg in entries.items()}
    raw["runs"] = {}
    raw["label_fraction"]["runs"] = raw["frozen_parts"]["runs"] = []  # they list runs
    drop_report_rows_of_absent_entries(raw)  # so do the report's rows
    params = validate_with_method_configs(raw)
    assert params["multihead"]["mh_inherit"]["seg_beta"] is None
    section, entry = pretrain_entry(params, "mh_inherit")
    assert section == "multihead" and entry["seg_beta"] == 7.0
    assert pretrain_entry(params, "mh_fixed")[1]["seg_beta"] == 2.0
    method = build_method("mh_inherit", entry, seed=0)
    assert isinstance(method, MultiheadAutoencoder) and method.seg_beta == 7.0
    out = method.training_step(_batch(2))
    expected = out["ae_loss"] + 7.0 * out["seg_loss"] + 1.0 * out["cls_loss"] + out["disc"]
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_three_dimensional_multihead_model_gives_volumes_and_logits():
    # Shapes are what is tested: 4^3-voxel windows and a decoder attending at 1/8 scale keep
    # the largest attention matrices small (7^3 windows and the 2D tests' decoder, attending
    # at 1/2 scale over 8,192 voxels, took this test to 1.5 GB, the suite's largest).
    backbone = {**SWIN, "spatial_dims": 3, "window_size": 4}
    decoder = {**_cfg()["decoder"], "channel_multipliers": [1, 2, 4, 8]}
    method = _method(backbone=backbone, decoder=decoder).eval()
    # SwinUNETR divides each side by 32; its deepest instance norm needs more than one element.
    volume = torch.rand(1, 1, 32, 64, 32)
    with torch.no_grad():
        out = method.forward_heads(volume)
    assert tuple(out["ae"].recon.shape) == (1, 1, 32, 64, 32)
    assert tuple(out["seg"].shape) == (1, 2, 32, 64, 32)
    assert tuple(out["cls"].shape) == (1, 2)


class _Labelled(torch.utils.data.Dataset):
    """Slices with labels only, as ``expected_class_counts`` reads them."""


def test_balanced_cls_weights_come_from_the_expected_counts_of_the_training_data(synthetic_processed):
    from chestssl.data.datasets import SliceDataset
    from chestssl.data.slice_epochs import EpochSliceDataset

    slices = SliceDataset(synthetic_processed, "train", SIZE, "pretrain")
    for data in (slices, EpochSliceDataset(slices, seed=0)):
        method = _method(cls_class_weights="balanced")
        clean, nodule = data.expected_class_counts()
        assert clean > nodule > 0
        recorded = method.fit_class_weights(data)
        total = clean + nodule
        assert method.cls_class_weights.tolist() == pytest.approx([total / (2 * clean), total / (2 * nodule)])
        assert recorded["cls_class_weights"]["nodule"] == pytest.approx(total / (2 * nodule))
        assert recorded["cls_train_class_counts"] == {"clean": round(clean, 3), "nodule": round(nodule, 3)}
        # The weights are a buffer: the saved method and a resumed run keep them.
        assert torch.equal(method.state_dict()["cls_class_weights"], method.cls_class_weights)
    # Explicit weights stay as given; the counts are still recorded.
    method = _method(cls_class_weights=[1.0, 3.0])
    assert method.fit_class_weights(slices)["cls_class_weights"] == {"clean": 1.0, "nodule": 3.0}
    with pytest.raises(ValueError, match=r"multihead.mh_tiny.cls_class_weights: 'balanced' needs slice labels"):
        _method(cls_class_weights="balanced").fit_class_weights(_Labelled())
