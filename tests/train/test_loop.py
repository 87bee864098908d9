"""The training loop: learning, determinism, resume, dvclive logs, max_steps, best
checkpoint, and a two-process DistributedDataParallel run (Gloo, CPU).

The fits run on the device named by the environment variable ``CHESTSSL_TEST_DEVICE``
(default ``cpu``): ``CHESTSSL_TEST_DEVICE=cuda`` runs them on the GPU, where mixed
precision is real (autocast and, for fp16, loss scaling), so training, AMP and resume
after an interruption are checked there too.
"""

from __future__ import annotations

import math

import csv
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from chestssl.train.checkpoint import files_digest, stage_inputs
from chestssl.train.loop import FitResult, build_scheduler, fit

WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0])
#: Where the fits train: ``cpu`` (default) or ``cuda``.
DEVICE = os.environ.get("CHESTSSL_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"CHESTSSL_TEST_DEVICE: got {DEVICE!r}, expected 'cpu' or 'cuda'")
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("CHESTSSL_TEST_DEVICE=cuda but no CUDA GPU is visible to PyTorch")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="mixed precision runs on CUDA only (CHESTSSL_TEST_DEVICE=cuda)")


@pytest.fixture(autouse=True)
def _quiet_cpu(tmp_path, monkeypatch):
    # One thread (the machine is shared); run in tmp_path so dvclive finds no DVC repo.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(threads)


class Regression(Dataset):
    """y = x . WEIGHTS + 0.5 with x ~ N(0, I_4); items are dicts like SliceDataset's."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x @ WEIGHTS + 0.5

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.y[index], "sample_id": f"s{index}"}


class TinyRegressor(nn.Module):
    """A two-layer MLP with dropout, so training draws on the global RNG too.

    ``fail_at_call`` raises on that training_step call (an interrupted run).
    """

    def __init__(self, dropout: float = 0.1, fail_at_call: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.fail_at_call = fail_at_call
        self.calls = 0

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError("simulated interruption")
        error = self.net(batch["x"]).squeeze(-1) - batch["y"]
        return {"loss": (error**2).mean(), "mae": error.abs().mean()}

    def validation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        error = self.net(batch["x"]).squeeze(-1) - batch["y"]
        return {"loss": (error**2).mean()}


def make_model(seed: int = 0, **kwargs) -> TinyRegressor:
    torch.manual_seed(seed)
    return TinyRegressor(**kwargs)


def train_cfg(**overrides) -> dict:
    cfg = dict(
        epochs=4, batch_size=8, lr=0.01, weight_decay=0.0, optimizer="adam", betas=[0.9, 0.999],
        scheduler="cosine", grad_clip=1.0, max_steps=0, amp=False, num_workers=0, log_every=2, device=DEVICE,
    )
    cfg.update(overrides)
    return cfg


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def run_fit(tmp_path: Path, name: str, model: nn.Module, cfg: dict, seed: int = 0, **kwargs) -> FitResult:
    return fit(model, Regression(48, 1), Regression(16, 2), cfg, tmp_path / name / "live",
               tmp_path / name / "ckpt.pt", seed, **kwargs)


def test_loss_falls_on_a_regression_problem(tmp_path):
    model = make_model(dropout=0.0)
    val = Regression(16, 2)
    with torch.no_grad():
        initial = model.validation_step({"x": val.x, "y": val.y})["loss"].item()
    result = fit(model, Regression(64, 1), val, train_cfg(epochs=15, lr=0.03), tmp_path / "live",
                 tmp_path / "ckpt.pt", seed=0)
    assert result.best_value < 0.05 * initial
    assert result.final_metrics["train/loss"] < 0.1 * result.history[0]["train/loss"]
    assert result.epochs == 15 and result.steps == 15 * 8
    assert not (tmp_path / "ckpt.pt").exists(), "the checkpoint is deleted after a successful fit"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_two_fits_give_bitwise_identical_weights(tmp_path, num_workers):
    cfg = train_cfg(num_workers=num_workers, epochs=3)
    first_model, second_model = make_model(), make_model()
    first = run_fit(tmp_path, "a", first_model, cfg)
    second = run_fit(tmp_path, "b", second_model, cfg)
    assert_same_weights(first_model.state_dict(), second_model.state_dict())
    assert_same_weights(first.best_state, second.best_state)
    assert first.history == second.history
    other_model = make_model()
    run_fit(tmp_path, "c", other_model, cfg, seed=1)
    assert not torch.equal(other_model.net[0].weight, first_model.net[0].weight), "the seed must matter"


@pytest.mark.parametrize("scheduler, schedule", [("cosine", {}), ("plateau", {}),
                                                 ("cosine", {"warmup_epochs": 2.5, "min_lr": 1e-4})])
def test_interrupted_then_resumed_fit_equals_uninterrupted(tmp_path, scheduler, schedule, capsys):
    cfg = train_cfg(epochs=4, scheduler=scheduler, optimizer="adamw", weight_decay=0.01, **schedule)
    reference_model = make_model()
    reference = run_fit(tmp_path, "reference", reference_model, cfg)

    # 48 samples / batch 8 = 6 steps per epoch: call 15 is in the third epoch.
    interrupted = make_model(fail_at_call=15)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_fit(tmp_path, "run", interrupted, cfg)
    checkpoint = tmp_path / "run" / "ckpt.pt"
    assert checkpoint.exists()
    # The curves so far are kept beside the checkpoint; the curve folder is written when
    # the fit ends (a fresh fit empties it when it starts).
    work_curves = tmp_path / "run" / "ckpt.live" / "plots" / "metrics"
    assert max(int(r["step"]) for r in read_tsv(work_curves / "train/loss.tsv")) > 12
    assert not any((tmp_path / "run" / "live" / "plots" / "metrics").iterdir())
    # DVC removes a stage's outputs (not `persist`) before running it again.
    shutil.rmtree(tmp_path / "run" / "live")

    resumed_model = make_model()
    resumed = run_fit(tmp_path, "run", resumed_model, cfg)
    assert resumed.resumed and "resuming from" in capsys.readouterr().err
    assert resumed_model.calls == 2 * 6, "only epochs 3 and 4 are trained again"
    assert_same_weights(reference_model.state_dict(), resumed_model.state_dict())
    assert_same_weights(reference.best_state, resumed.best_state)
    assert (resumed.epochs, resumed.steps, resumed.best_epoch) == (reference.epochs, reference.steps,
                                                                   reference.best_epoch)
    assert resumed.history == reference.history
    assert not checkpoint.exists() and not work_curves.exists()
    # The dvclive curves continue without duplicate steps and match the uninterrupted run.
    for name in ("train/loss.tsv", "train/mae.tsv", "val/loss.tsv", "lr.tsv"):
        assert read_tsv(tmp_path / "run/live/plots/metrics" / name) == \
            read_tsv(tmp_path / "reference/live/plots/metrics" / name), name


def _learning_rates(cfg: dict, total_steps: int, steps_per_epoch: int) -> list[float]:
    """The learning rate of each of ``total_steps`` steps under ``cfg``'s schedule."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg["lr"])
    scheduler = build_scheduler(optimizer, cfg, total_steps, "min", steps_per_epoch)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates


def test_warm_up_rises_linearly_then_the_cosine_ends_at_its_floor():
    cfg = train_cfg(lr=0.1, scheduler="cosine", warmup_epochs=1.5, min_lr=0.01)
    rates = _learning_rates(cfg, total_steps=20, steps_per_epoch=4)  # a warm-up of 6 steps
    assert rates[:7] == pytest.approx([0.1 * k / 7 for k in range(1, 8)][:6] + [0.1])
    assert rates[6] == pytest.approx(0.1) and all(a > b for a, b in zip(rates[6:], rates[7:]))
    cosine_steps = 20 - 6
    assert rates[-1] == pytest.approx(0.01 + 0.09 * (1 + np.cos(np.pi * (cosine_steps - 1) / cosine_steps)) / 2)
    # `none` with a warm-up: the same rise, then constant.
    flat = _learning_rates({**cfg, "scheduler": "none", "min_lr": 0.0}, total_steps=20, steps_per_epoch=4)
    assert flat[:6] == pytest.approx(rates[:6]) and flat[6:] == pytest.approx([0.1] * 14)


def test_without_warm_up_or_floor_the_schedule_is_plain_cosine_annealing_to_zero():
    """The recipes that set neither key train exactly as before the keys existed."""
    cfg = train_cfg(lr=0.1, scheduler="cosine")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, cfg, 12, "min", 4)
    assert type(scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert (scheduler.T_max, scheduler.eta_min) == (12, 0.0)
    assert build_scheduler(optimizer, train_cfg(scheduler="none"), 12, "min", 4) is None


def test_accumulated_half_batches_train_as_whole_batches(tmp_path):
    """Two batches of 4 per step give the whole batch of 8's gradient (a mean loss over
    equal halves), so the same weights, steps and schedule, up to rounding."""
    whole_model, halves_model = make_model(dropout=0.0), make_model(dropout=0.0)
    whole = run_fit(tmp_path, "whole", whole_model, train_cfg(batch_size=8, grad_clip=0.0))
    halves = run_fit(tmp_path, "halves", halves_model, train_cfg(batch_size=4, accumulate=2, grad_clip=0.0))
    assert (halves.steps, halves.epochs) == (whole.steps, whole.epochs) == (4 * 6, 4)
    for key, value in whole_model.state_dict().items():
        torch.testing.assert_close(halves_model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert read_tsv(tmp_path / "halves/live/plots/metrics/lr.tsv") == read_tsv(tmp_path / "whole/live/plots/metrics/lr.tsv")


def test_an_epoch_ends_with_a_shorter_accumulation_and_resumes_identically(tmp_path):
    """48 items in batches of 8 are 6 batches: with accumulate 4, a step of 4 then one of 2."""
    cfg = train_cfg(epochs=3, batch_size=8, accumulate=4, scheduler="cosine", warmup_epochs=1.0)
    reference_model = make_model()
    reference = run_fit(tmp_path, "reference", reference_model, cfg)
    assert reference.steps == 3 * 2 and reference_model.calls == 3 * 6
    interrupted = make_model(fail_at_call=9)  # in the second epoch, inside its first step
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_fit(tmp_path, "run", interrupted, cfg)
    shutil.rmtree(tmp_path / "run" / "live")
    resumed_model = make_model()
    resumed = run_fit(tmp_path, "run", resumed_model, cfg)
    assert resumed.resumed and resumed.steps == reference.steps
    assert_same_weights(reference_model.state_dict(), resumed_model.state_dict())


def test_checkpoint_of_a_different_fit_is_not_resumed(tmp_path, capsys):
    with pytest.raises(RuntimeError):
        run_fit(tmp_path, "run", make_model(fail_at_call=8), train_cfg())
    assert (tmp_path / "run" / "ckpt.pt").exists()
    model = make_model()
    result = run_fit(tmp_path, "run", model, train_cfg(lr=0.02))
    err = capsys.readouterr().err
    assert "belongs to a different fit (changed: train config); starting fresh" in err
    assert not result.resumed and model.calls == 4 * 6


def test_checkpoint_is_not_resumed_on_changed_data_or_params(tmp_path, capsys):
    """The stage's data (every image replaced by 1 - image, same shapes) and its params entry
    are part of the fingerprint: an interrupted fit is never finished on other inputs."""
    data = tmp_path / "processed" / "scans"
    data.mkdir(parents=True)
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.savez(data / "p0.npz", image=image)
    entry = {"task": "seg", "init": "scratch", "train": train_cfg()}

    def inputs(params=entry):
        return stage_inputs(params, [tmp_path / "processed"])

    with pytest.raises(RuntimeError):
        run_fit(tmp_path, "run", make_model(fail_at_call=8), train_cfg(), inputs=inputs())
    np.savez(data / "p0.npz", image=1 - image)
    model = make_model()
    result = run_fit(tmp_path, "run", model, train_cfg(), inputs=inputs())
    assert "belongs to a different fit (changed: input data); starting fresh" in capsys.readouterr().err
    assert not result.resumed and model.calls == 4 * 6

    with pytest.raises(RuntimeError):
        run_fit(tmp_path, "run", make_model(fail_at_call=8), train_cfg(), inputs=inputs())
    model = make_model()
    result = run_fit(tmp_path, "run", model, train_cfg(), inputs=inputs({**entry, "init": "ae_swin"}))
    assert "(changed: input params)" in capsys.readouterr().err and not result.resumed

    with pytest.raises(RuntimeError):
        run_fit(tmp_path, "run", make_model(fail_at_call=8), train_cfg(), inputs=inputs())
    result = run_fit(tmp_path, "run", make_model(), train_cfg(), inputs=inputs())
    assert result.resumed, "the same data and params resume"


def test_files_digest_reads_content_names_and_missing_paths(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"abc")
    first = files_digest([tmp_path / "d"])
    stat = (tmp_path / "d" / "a.bin").stat()
    (tmp_path / "d" / "a.bin").write_bytes(b"abd")
    os.utime(tmp_path / "d" / "a.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time
    assert files_digest([tmp_path / "d"]) != first
    (tmp_path / "d" / "a.bin").write_bytes(b"abc")
    assert files_digest([tmp_path / "d"]) == first
    (tmp_path / "d" / "a.bin").rename(tmp_path / "d" / "b.bin")
    assert files_digest([tmp_path / "d"]) != first
    assert files_digest([tmp_path / "missing"]) != files_digest([])


def test_dvclive_metrics_use_the_optimisation_step(tmp_path):
    live_dir = tmp_path / "run" / "live"
    live_dir.mkdir(parents=True)
    (live_dir / "stale.txt").write_text("from an earlier run")
    run_fit(tmp_path, "run", make_model(), train_cfg(epochs=3, log_every=4))
    assert not (live_dir / "stale.txt").exists(), "a fresh run starts with an empty live_dir"
    metrics = live_dir / "plots" / "metrics"
    train_rows = read_tsv(metrics / "train" / "loss.tsv")
    assert list(train_rows[0]) == ["step", "loss"]
    assert [int(r["step"]) for r in train_rows] == [4, 8, 12, 16]
    assert [int(r["step"]) for r in read_tsv(metrics / "val" / "loss.tsv")] == [6, 12, 18]
    assert [int(r["step"]) for r in read_tsv(metrics / "lr.tsv")] == [4, 8, 12, 16]
    assert (metrics / "train" / "mae.tsv").exists()
    lrs = [float(r["lr"]) for r in read_tsv(metrics / "lr.tsv")]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.01, "cosine decay per step"
    assert [p.name for p in live_dir.iterdir()] == ["plots"], "the curve folder holds the curves only"
    assert not (tmp_path / "run" / "ckpt.live").exists(), "the working curves go with the checkpoint"


def test_max_steps_stops_training_across_epochs(tmp_path):
    model = make_model()
    result = run_fit(tmp_path, "run", model, train_cfg(epochs=10, max_steps=9, log_every=1))
    assert result.steps == 9 and model.calls == 9
    assert result.epochs == 2, "the second epoch is cut short after 3 of its 6 steps"
    lrs = [float(r["lr"]) for r in read_tsv(tmp_path / "run/live/plots/metrics/lr.tsv")]
    assert len(lrs) == 9 and lrs[-1] == pytest.approx(0.0, abs=1e-12), "cosine spans max_steps"
    assert [int(r["step"]) for r in read_tsv(tmp_path / "run/live/plots/metrics/val/loss.tsv")] == [6, 9]


class ScriptedScore(TinyRegressor):
    """Validation reports a scripted ``score`` per epoch and records the weights it saw."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__(dropout=0.0)
        self.scores, self.snapshots, self.validations = scores, [], 0

    def validation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        # The loop validates once per epoch with a single batch here (16 samples, batch 16).
        score = self.scores[self.validations]
        self.validations += 1
        self.snapshots.append({k: v.clone() for k, v in self.state_dict().items()})
        return {"score": torch.tensor(score), "loss": super().validation_step(batch)["loss"]}


@pytest.mark.parametrize(
    ("mode", "scores", "best_epoch"),
    [("min", [3.0, 1.0, 1.0, 2.0], 2), ("max", [1.0, 5.0, 4.0, 5.0], 2), ("max", [1.0, 2.0, 3.0, 4.0], 4)],
)
def test_best_state_follows_the_monitor(tmp_path, mode, scores, best_epoch):
    torch.manual_seed(0)
    model = ScriptedScore(scores)
    result = run_fit(tmp_path, "run", model, train_cfg(batch_size=16), monitor="val/score", mode=mode)
    assert result.best_epoch == best_epoch
    assert result.best_value == scores[best_epoch - 1]
    assert_same_weights(result.best_state, model.snapshots[best_epoch - 1])
    assert result.final_metrics["val/score"] == scores[-1]


def test_validation_every_few_epochs_and_always_the_last(tmp_path):
    """``val_every_epochs: 2`` over 5 epochs validates epochs 2, 4 and 5; the best model is
    chosen among those only, and resuming keeps the cadence."""
    torch.manual_seed(0)
    model = ScriptedScore([2.0, 1.0, 3.0])  # the scores of epochs 2, 4 and 5
    result = run_fit(tmp_path, "run", model, train_cfg(batch_size=16, epochs=5, val_every_epochs=2),
                     monitor="val/score", mode="min")
    assert model.validations == 3
    assert result.best_epoch == 4 and result.best_value == 1.0
    assert_same_weights(result.best_state, model.snapshots[1])
    assert result.final_metrics["val/score"] == 3.0
    validated = [int(h["epoch"]) for h in result.history if "val/score" in h]
    assert validated == [2, 4, 5] and [int(h["epoch"]) for h in result.history] == [1, 2, 3, 4, 5]
    steps = [int(r["step"]) for r in read_tsv(tmp_path / "run/live/plots/metrics/val/score.tsv")]
    assert steps == [6, 12, 15], "logged at the validated epochs' last steps (3 steps an epoch)"


def test_a_step_limit_validates_the_epoch_it_stops_in(tmp_path):
    model = ScriptedScore([1.0])
    result = run_fit(tmp_path, "run", model, train_cfg(batch_size=16, epochs=10, max_steps=4, val_every_epochs=5),
                     monitor="val/score")
    assert model.validations == 1 and result.epochs == 2 and result.best_epoch == 2


def test_unknown_monitor_and_bad_step_output_are_explained(tmp_path):
    with pytest.raises(KeyError, match="monitor 'val/dice' is not among the epoch's metrics"):
        run_fit(tmp_path, "a", make_model(), train_cfg(), monitor="val/dice")

    class NoLoss(TinyRegressor):
        def training_step(self, batch):
            return {"mae": super().training_step(batch)["mae"]}

    with pytest.raises(TypeError, match="'loss' is a scalar tensor"):
        run_fit(tmp_path, "b", NoLoss(), train_cfg())


def test_non_finite_loss_stops_with_advice(tmp_path):
    class Diverging(TinyRegressor):
        def training_step(self, batch):
            output = super().training_step(batch)
            return {**output, "loss": output["loss"] * float("nan")}

    with pytest.raises(FloatingPointError, match="the training loss is nan at step 2 .* lower train.lr"):
        run_fit(tmp_path, "run", Diverging(), train_cfg())


class PrecisionRecorder(TinyRegressor):
    """Records the autocast state each training step runs under (on the training device),
    and the precision its first layer computes in."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.seen: set[tuple[bool, torch.dtype]] = set()
        self.computed: set[torch.dtype] = set()

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        device = batch["x"].device.type
        self.seen.add((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        self.computed.add(self.net[0](batch["x"]).dtype)
        return super().training_step(batch)


@pytest.mark.parametrize("amp_dtype, dtype, scaled", [("fp16", torch.float16, True), ("bf16", torch.bfloat16, False)])
def test_amp_dtype_sets_the_autocast_precision_and_loss_scaling(tmp_path, monkeypatch, amp_dtype, dtype, scaled):
    """Where mixed precision runs (CUDA; on the CPU its autocast stands in for it), fp16
    scales the loss and bf16 does not."""
    import chestssl.train.loop as loop

    if DEVICE == "cpu":
        monkeypatch.setattr(loop, "amp_enabled", lambda requested, device, announce=True: requested)
    scalers = []
    original = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scalers.append(k["enabled"]) or original(*a, **k))
    model = PrecisionRecorder()
    result = run_fit(tmp_path, amp_dtype, model, train_cfg(amp=True, amp_dtype=amp_dtype, epochs=1))
    assert model.seen == {(True, dtype)} and scalers == [scaled]
    assert model.computed == {dtype}, "the layers compute in the autocast precision"
    assert model.net[0].weight.dtype == torch.float32, "the weights stay in fp32"
    assert np.isfinite(result.final_metrics["train/loss"]) and np.isfinite(result.final_metrics["val/loss"])


@cuda_only
@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_mixed_precision_fit_learns_and_resumes_identically(tmp_path, amp_dtype, capsys):
    """On CUDA under autocast (fp16 with its GradScaler, whose state the checkpoint keeps;
    bf16 without): the loss falls, and a fit interrupted in its third epoch resumes to
    the uninterrupted fit's weights."""
    cfg = train_cfg(epochs=4, amp=True, amp_dtype=amp_dtype, optimizer="adamw", weight_decay=0.01, lr=0.03)
    reference_model = make_model()
    reference = run_fit(tmp_path, "reference", reference_model, cfg)
    assert reference.final_metrics["train/loss"] < 0.9 * reference.history[0]["train/loss"]
    assert all(np.isfinite(h["train/loss"]) and np.isfinite(h["val/loss"]) for h in reference.history)
    interrupted = make_model(fail_at_call=15)  # 6 steps per epoch: in the third epoch
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_fit(tmp_path, "run", interrupted, cfg)
    assert (tmp_path / "run" / "ckpt.pt").exists()
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert "cuda" in checkpoint["rng"][0], "the GPU's RNG state is saved"
    if amp_dtype == "fp16":
        assert checkpoint["scaler"]["scale"] > 0, "the loss scale is saved"
    shutil.rmtree(tmp_path / "run" / "live")
    resumed_model = make_model()
    resumed = run_fit(tmp_path, "run", resumed_model, cfg)
    assert resumed.resumed and "resuming from" in capsys.readouterr().err
    assert resumed_model.calls == 2 * 6
    assert_same_weights(reference_model.state_dict(), resumed_model.state_dict())
    assert resumed.history == reference.history
    assert resumed.device == "cuda" and resumed.memory_kind == "cuda_max_allocated"


def test_amp_requested_on_cpu_trains_in_fp32(tmp_path, capsys):
    amp_model, fp32_model = make_model(), make_model()
    run_fit(tmp_path, "amp", amp_model, train_cfg(amp=True, epochs=2, device="cpu"))
    assert "train.amp is true but training runs on the CPU: using fp32" in capsys.readouterr().err
    run_fit(tmp_path, "fp32", fp32_model, train_cfg(amp=False, epochs=2, device="cpu"))
    assert amp_model.net[0].weight.dtype == torch.float32
    assert torch.equal(amp_model.net[0].weight, fp32_model.net[0].weight)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    os.chdir(out_dir)
    model = make_model()
    result = fit(model, Regression(32, 1), Regression(10, 2), train_cfg(epochs=2, batch_size=4),
                 Path(out_dir) / "live", Path(out_dir) / "ckpt.pt", seed=0)
    torch.save({"weights": model.state_dict(), "best_state": result.best_state, "is_main": result.is_main,
                "steps": result.steps, "final_metrics": result.final_metrics, "calls": model.calls},
               Path(out_dir) / f"rank{rank}.pt")
    # Accumulating two batches per step: the processes synchronise at each step's last batch only.
    accumulating = make_model()
    steps = fit(accumulating, Regression(32, 1), Regression(10, 2), train_cfg(epochs=2, batch_size=4, accumulate=2),
                Path(out_dir) / "accumulate" / "live", Path(out_dir) / "accumulate" / "ckpt.pt", seed=0).steps
    torch.save({"weights": accumulating.state_dict(), "steps": steps, "calls": accumulating.calls},
               Path(out_dir) / f"accumulate_rank{rank}.pt")


@pytest.mark.skipif(DEVICE == "cuda", reason="two ranks on one GPU: NCCL refuses two processes on the same device; "
                    "DDP is checked on the CPU (Gloo)")
def test_ddp_two_processes_gloo_stay_in_sync(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_same_weights(rank0["weights"], rank1["weights"])
    assert not torch.equal(rank0["weights"]["net.0.weight"], make_model().net[0].weight), "training happened"
    assert rank0["is_main"] and rank0["best_state"] is not None
    assert not rank1["is_main"] and rank1["best_state"] is None
    # 32 samples over 2 ranks, batch 4: 4 steps per epoch on each rank.
    assert rank0["steps"] == rank1["steps"] == 8 and rank0["calls"] == rank1["calls"] == 8
    # Validation metrics are reduced over both ranks' shards (10 samples: 5 + 5).
    assert rank0["final_metrics"] == rank1["final_metrics"]
    assert (tmp_path / "live" / "plots" / "metrics" / "val" / "loss.tsv").exists()
    assert not (tmp_path / "ckpt.pt").exists()
    accumulated = [torch.load(tmp_path / f"accumulate_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert_same_weights(accumulated[0]["weights"], accumulated[1]["weights"])
    assert accumulated[0]["steps"] == 4 and accumulated[0]["calls"] == 8, "2 steps of 2 batches per epoch"
    assert not torch.equal(accumulated[0]["weights"]["net.0.weight"], rank0["weights"]["net.0.weight"])


class WholePassRegressor(TinyRegressor):
    """Reports a whole-pass metric that differs from the mean of its batch values."""

    def validation_step(self, batch: dict) -> dict[str, torch.Tensor]:
        return {**super().validation_step(batch), "pass_metric": torch.tensor(1.0), "undefined": torch.tensor(2.0)}

    def validation_epoch_end(self) -> dict[str, torch.Tensor]:
        return {"pass_metric": torch.tensor(0.25), "undefined": torch.tensor(float("nan"))}


def test_whole_pass_metrics_replace_batch_means_unless_undefined(tmp_path):
    torch.manual_seed(0)
    result = fit(WholePassRegressor(), Regression(32, 0), Regression(16, 1), train_cfg(epochs=1),
                 tmp_path / "live", tmp_path / "ckpt.pt", seed=0)
    assert result.final_metrics["val/pass_metric"] == pytest.approx(0.25)
    assert result.final_metrics["val/undefined"] == pytest.approx(2.0)


def test_a_monitor_undefined_in_every_validation_keeps_the_final_weights(tmp_path):
    """A whole-pass monitor that is never a number (e.g. AUROC when the validation split holds
    one class of every label) is no error: no epoch is the best, the final weights are returned."""

    class OnlyUndefined(TinyRegressor):
        def validation_epoch_end(self) -> dict[str, torch.Tensor]:
            return {"auroc": torch.tensor(float("nan"))}

    model = make_model()
    model.__class__ = OnlyUndefined
    result = run_fit(tmp_path, "run", model, train_cfg(epochs=2), monitor="val/auroc", mode="max")
    assert math.isnan(result.best_value) and result.best_epoch == 2 and "val/auroc" not in result.final_metrics
    assert_same_weights(result.best_state, model.state_dict())


def test_a_validation_that_scores_nothing_says_why(tmp_path):
    class ScoresNothing(TinyRegressor):
        def validation_step(self, batch: dict) -> dict[str, torch.Tensor]:
            return {}  # e.g. a loss that needs two items, on a validation split of one

    model = make_model()
    model.__class__ = ScoresNothing
    with pytest.raises(ValueError, match=r"validation gave no metrics.*holds 16 items in batches of 8"):
        run_fit(tmp_path, "run", model, train_cfg(epochs=1))


def test_epoch_hook_is_logged_and_leaves_the_trajectory_unchanged(tmp_path):
    calls: list[tuple[int, bool]] = []

    def probe(model: nn.Module, epoch: int) -> dict[str, float]:
        calls.append((epoch, model.training))
        torch.rand(100)  # a hook that draws random numbers must not shift training's
        return {"probe/score": float(epoch) / 10} if epoch % 2 == 0 else {}

    cfg = train_cfg(epochs=4)
    plain_model, hooked_model = make_model(), make_model()
    plain = run_fit(tmp_path, "plain", plain_model, cfg)
    hooked = run_fit(tmp_path, "hooked", hooked_model, cfg, epoch_hook=probe)
    assert calls == [(1, False), (2, False), (3, False), (4, False)]
    assert hooked_model.training, "the model is back in training mode after the hook"
    assert_same_weights(plain_model.state_dict(), hooked_model.state_dict())
    rows = read_tsv(tmp_path / "hooked" / "live" / "plots" / "metrics" / "probe" / "score.tsv")
    assert [float(r["score"]) for r in rows] == [0.2, 0.4]
    assert hooked.final_metrics["probe/score"] == 0.4 and "probe/score" not in plain.final_metrics


def test_validation_means_count_only_the_batches_that_report_a_metric(tmp_path):
    class SkipsSmallBatches(TinyRegressor):
        def validation_step(self, batch: dict) -> dict[str, torch.Tensor]:
            if batch["x"].shape[0] < 2:  # e.g. a statistic that needs two samples
                return {}
            return {"one": torch.tensor(1.0), "loss": torch.tensor(2.0)}

    model = make_model()
    model.__class__ = SkipsSmallBatches
    # 16 validation items in batches of 5: three full batches and one of a single item.
    result = run_fit(tmp_path, "skip", model, train_cfg(epochs=1, batch_size=5))
    assert result.final_metrics["val/one"] == 1.0 and result.final_metrics["val/loss"] == 2.0


class _Stop(Exception):
    pass


def test_finetune_stage_fingerprints_its_data_and_run_entry(synthetic_processed, tmp_path, monkeypatch):
    """The issue's reproduction at the stage: the same run on images replaced by 1 - image
    (same shapes) must not count as the same fit."""
    import runpy
    import shutil


    import chestssl.train.loop as loop
    from chestssl.methods import build_method
    from chestssl.model_files import save_model_file
    from chestssl.params import load_params
    from tests.pipeline.conftest import REPO_ROOT

    project = tmp_path / "project"
    shutil.copytree(synthetic_processed, project / "data" / "processed")
    shutil.copy(REPO_ROOT / "params.yaml", project / "params.yaml")
    shutil.copytree(REPO_ROOT / "params", project / "params")
    params = load_params(project / "params.yaml")
    init = params["runs"]["seg_swinunetr_scratch"]["init"]
    save_model_file(project / "models" / "pretrain" / init / "encoder.pt",
                    build_method(init, params["methods"][init], params["seed"]).export())
    monkeypatch.chdir(project)
    seen = []

    def record(*args, inputs=None, **kwargs):
        seen.append(fingerprint_parts(inputs))
        raise _Stop

    def fingerprint_parts(inputs):
        from chestssl.train.checkpoint import fingerprint

        return fingerprint({f"input {name}": value for name, value in inputs.items()})

    monkeypatch.setattr(loop, "fit", record)
    finetune = runpy.run_path(str(REPO_ROOT / "stages" / "finetune.py"))["main"]
    for _ in range(2):
        with pytest.raises(_Stop):
            finetune(["seg_swinunetr_scratch"])
    for path in sorted((project / "data" / "processed" / "scans").glob("*.npz")):
        with np.load(path) as arrays:
            scan = dict(arrays)
        scan["image"] = (1 - scan["image"].astype(np.float32)).astype(np.float16)
        np.savez_compressed(path, **scan)
    with pytest.raises(_Stop):
        finetune(["seg_swinunetr_scratch"])
    assert seen[0] == seen[1], "the same inputs give the same fingerprint"
    assert seen[2]["input data"] != seen[0]["input data"] and seen[2]["input params"] == seen[0]["input params"]
