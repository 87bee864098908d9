"""The training loop every stage uses: :func:`fit`.

A model is a ``torch.nn.Module`` with

- ``training_step(batch: dict) -> dict[str, Tensor]``: the key ``"loss"`` (a scalar
  that requires grad) is optimised; the other scalar entries are logged as
  ``train/<key>`` (non-scalar entries are not logged);
- ``validation_step(batch: dict) -> dict[str, Tensor]``: scalar metrics, averaged over
  the validation set weighted by batch size and logged as ``val/<key>``.

Under DistributedDataParallel the loop looks for trainable parameters that a step
leaves unused (a head trained on some batches only would otherwise stop DDP); a model
that uses all of them in every step may set the attribute
``ddp_find_unused_parameters = False`` to skip that search.

Batches are what the DataLoader's collate function makes (by default: dicts of stacked
tensors, lists of strings for ids); the loop moves their tensors to the device.

What the loop takes care of:

- device ``auto`` (CUDA when present), automatic mixed precision on CUDA when
  ``train.amp`` is true (``torch.autocast`` float16 + ``GradScaler``, or bfloat16 without
  scaling: ``train.amp_dtype``), fp32 on the CPU;
- learning-rate warm-up and schedules, gradient accumulation (``train.accumulate``);
- ``torchrun`` multi-GPU / multi-node training (DistributedDataParallel; see
  :mod:`chestssl.train.distributed`): rank 0 logs, writes the checkpoint and returns
  the weights;
- determinism: ``monai.utils.set_determinism``, data order and DataLoader worker seeds
  that depend only on (seed, epoch, rank), deterministic algorithms on the CPU, so two
  runs of the same fit give bitwise-identical weights on the CPU;
- a tqdm progress bar per epoch, dvclive metrics with ``step`` = optimisation step;
- a resume checkpoint after every epoch (written atomically) that an interrupted run
  continues from, giving the same final weights as an uninterrupted run; dvclive writes
  beside it (:func:`live_work_dir`, outside DVC's outputs), so a resumed run keeps its
  earlier curve points although the stage's outputs are not ``persist`` (DVC removes
  them before a run, and its run-cache can then restore an earlier run instead); the
  curves are copied to the stage's curve folder when the fit starts and when it ends;
- the best weights by a monitored metric, returned in :class:`FitResult` (the caller
  writes the model files), with the fit's wall-clock time and peak memory; validation
  every epoch, or every ``train.val_every_epochs`` and the last (an unvalidated epoch
  cannot be the best);
- the step plan (:func:`plan_steps`), which :mod:`chestssl.cost` also uses to estimate a
  protocol's steps; when it asks (:mod:`chestssl.train.cost_probe`), a fit measures a few
  batches instead of training.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from chestssl.io import atomic_dir, write_text
from chestssl.params import TRAIN_DEFAULTS, train_setting
from chestssl.train import cost_probe
from chestssl.train.checkpoint import (
    capture_rng_state,
    describe_mismatch,
    fingerprint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    state_dict_digest,
)
from chestssl.train.devices import amp_enabled, batch_size_of, move_to_device
from chestssl.train.cost_probe import CostRequest
from chestssl.train.distributed import (
    DistContext,
    ShardSampler,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    setup_distributed,
)

#: The keys of a ``train`` block; ``warmup_epochs``, ``min_lr``, ``accumulate``, ``amp_dtype``
#: and ``val_every_epochs`` may be left out (:data:`chestssl.params.TRAIN_DEFAULTS`).
TRAIN_KEYS = (
    "epochs", "batch_size", "lr", "weight_decay", "optimizer", "betas", "scheduler", "grad_clip",
    "max_steps", "amp", "num_workers", "log_every", "device",
)
OPTIMIZERS = ("adam", "adamw", "sgd")
#: ``train.amp_dtype``: the autocast precision when ``train.amp`` is true.
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULERS = ("none", "cosine", "plateau")
# ReduceLROnPlateau settings of seed 000's segmentation fine-tuning.
PLATEAU_FACTOR = 0.1
PLATEAU_PATIENCE = 5


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``best_state`` is the model's state dict (CPU tensors) at the epoch with the best
    ``monitor`` value (ties keep the earlier epoch); ``None`` on ranks other than 0 of a
    distributed run. ``final_metrics`` holds the last epoch's ``val/<key>`` metrics and
    its ``train/<key>`` means.
    """

    best_state: dict[str, torch.Tensor] | None
    best_value: float
    best_epoch: int
    best_step: int
    epochs: int
    steps: int
    final_metrics: dict[str, float]
    monitor: str
    mode: str
    resumed: bool = False
    is_main: bool = True
    history: list[dict[str, float]] = field(default_factory=list)
    #: Wall-clock seconds of training and validation, over every resumed part of the fit.
    train_seconds: float = 0.0
    #: Peak memory of rank 0 and what it measures (:func:`~chestssl.train.cost_probe.peak_memory`).
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    device: str = "cpu"
    world_size: int = 1


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    train_cfg: Mapping[str, Any],
    live_dir: str | Path,
    checkpoint_path: str | Path,
    seed: int,
    monitor: str = "val/loss",
    mode: str = "min",
    collate_fn: Callable | None = None,
    epoch_hook: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
    inputs: Mapping[str, Any] | None = None,
    keep_checkpoint: bool = False,
) -> FitResult:
    """Train ``model`` on ``train_data``, validating on ``val_data`` after every epoch.

    Args:
        model: a module with ``training_step`` and ``validation_step`` (module docstring).
            It is moved to the training device and left there with the final weights.
        train_data, val_data: map-style datasets of dict items.
        train_cfg: an entry's validated ``train`` settings (keys :data:`TRAIN_KEYS`).
        live_dir: the curve folder (a stage output): ``live_dir/plots/metrics/{train,val}/<key>.tsv``
            and ``live_dir/plots/metrics/lr.tsv``, with ``step`` = optimisation step.
            dvclive writes to :func:`live_work_dir` of ``checkpoint_path`` (emptied on a
            fresh run, appended to on a resume); when the fit starts and when it ends its
            curves replace ``live_dir`` whole (atomically), so nothing else is left in it.
        checkpoint_path: resume checkpoint, written after every epoch and deleted after a
            successful fit (with the curves beside it). If it exists and was made by the
            same fit (same ``train_cfg``, ``inputs``, seed, monitor, initial weights,
            dataset sizes and number of processes), training resumes from it; otherwise it
            starts fresh and says why.
        seed: seeds everything (weights are the caller's: build them seeded).
        monitor: metric that picks the best epoch, e.g. ``val/loss`` or ``val/dice``.
        mode: ``min`` or ``max``: whether lower or higher ``monitor`` is better.
        collate_fn: DataLoader collate function (default: torch's default collate).
        epoch_hook: called on rank 0 after each epoch's validation as
            ``epoch_hook(model, epoch)`` (epoch counted from 1) with the model in eval mode;
            the scalars it returns (e.g. ``probe/mean_auroc`` of a linear probe) are logged
            with the validation metrics. The RNG states are restored after it, so a hook
            never changes the training trajectory.
        inputs: what else defines the fit, by name: the stage's whole params entry and a
            digest of the data it reads (:func:`~chestssl.train.checkpoint.stage_inputs`),
            so a checkpoint is never resumed on edited params or changed data.
        keep_checkpoint: keep the checkpoint (and its curves) after a successful fit, for a
            stage that runs several fits: rerun after an interruption, the finished fits
            resume at their end instead of training again. The stage removes them with
            :func:`discard_checkpoint` once its outputs are written.
    """
    cfg = dict(train_cfg)
    if mode not in ("min", "max"):
        raise ValueError(f"mode: got {mode!r}, expected 'min' or 'max'")
    ctx = setup_distributed(cfg["device"])
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _Fit(model, train_data, val_data, cfg, Path(live_dir), Path(checkpoint_path), seed, monitor, mode,
                    collate_fn, ctx, epoch_hook, inputs, keep_checkpoint).run()
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@dataclass(frozen=True)
class StepPlan:
    """How many batches and optimisation steps a fit takes (:func:`plan_steps`)."""

    batches_per_epoch: int
    #: Batches per optimisation step (``train.accumulate``); an epoch's last step may take fewer.
    accumulate: int
    steps_per_epoch: int
    #: ``epochs`` x ``steps_per_epoch``, or ``max_steps`` when that is smaller.
    total_steps: int
    #: Whether the epoch's trailing batch is dropped (it would hold a single sample).
    drop_last: bool


def plan_steps(num_items: int, cfg: Mapping[str, Any], world_size: int = 1) -> StepPlan:
    """The batches and steps :func:`fit` takes on ``num_items`` training items.

    Each of ``world_size`` processes sees ``ceil(num_items / world_size)`` items per epoch
    (``DistributedSampler`` pads the last share). A trailing batch of a single sample is
    dropped: it breaks batch statistics (BatchNorm, the cross-correlation of Barlow
    Twins), and as the data order changes every epoch, the sample left out of one epoch
    is seen in the others. :func:`fit` trains by this plan and :mod:`chestssl.cost`
    estimates the full protocol's steps with it.
    """
    if num_items < 1 or world_size < 1:
        raise ValueError(f"num_items and world_size must be >= 1; got {num_items} and {world_size}")
    per_rank = math.ceil(num_items / world_size)
    batch_size = int(cfg["batch_size"])
    drop_last = per_rank > batch_size and per_rank % batch_size == 1
    batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    accumulate = int(train_setting(cfg, "accumulate"))
    steps_per_epoch = math.ceil(batches / accumulate)
    total = int(cfg["epochs"]) * steps_per_epoch
    total = min(total, int(cfg["max_steps"])) if int(cfg["max_steps"]) > 0 else total
    return StepPlan(batches, accumulate, steps_per_epoch, total, drop_last)


def build_optimizer(parameters: Iterable[nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD from a ``train`` block (for SGD, ``betas[0]`` is the momentum)."""
    parameters = list(parameters)
    beta1, beta2 = (float(b) for b in cfg["betas"])
    lr, weight_decay = float(cfg["lr"]), float(cfg["weight_decay"])
    name = cfg["optimizer"]
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=beta1, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int, mode: str, steps_per_epoch: int = 1
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """The learning-rate schedule of ``cfg``:

    - ``none``: constant; ``cosine``: cosine annealing from ``lr`` to ``min_lr`` (default 0)
      over ``total_steps`` optimisation steps, stepped after every step; ``plateau``:
      ReduceLROnPlateau (factor 0.1, patience 5, as in seed 000) on the monitored metric,
      stepped after every validation.
    - ``warmup_epochs`` > 0 (``none`` and ``cosine``): first a linear warm-up over that many
      epochs of steps (``steps_per_epoch`` each, rounded), from ``lr / (n + 1)`` to ``lr``
      in ``n`` steps; the cosine then spans the steps left. Seed 003 (Swin UNETR
      pretraining, Tang et al., CVPR 2022) warms up 4 epochs and decays to 1e-5.
    """
    name = cfg["scheduler"]
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE
        )
    warmup_steps = min(max(0, total_steps - 1), round(train_setting(cfg, "warmup_epochs") * steps_per_epoch))
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps
    ) if warmup_steps else None
    if name == "none":
        return warmup
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=train_setting(cfg, "min_lr")
    )
    if warmup is None:
        return cosine
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python, NumPy and MONAI's random transforms.

    ``torch.initial_seed()`` in a worker is the loader's base seed (drawn from the
    loader's seeded generator) plus the worker id, so every worker's stream is fixed by
    (seed, epoch, rank, worker).
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    monai_worker_init_fn(worker_id)


def loader_base_seed(generator_seed: int) -> int:
    """The base seed a DataLoader draws from its generator seeded with ``generator_seed``
    when an epoch's iterator starts (worker ``k`` is seeded with base + ``k``, and MONAI's
    ``worker_init_fn`` passes that to the dataset's random state)."""
    generator = torch.Generator().manual_seed(generator_seed)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed for one (seed, epoch, rank, stream); ``stream`` 0 is training, 1 validation."""
    state = np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def discard_checkpoint(checkpoint_path: str | Path) -> None:
    """Remove a fit's resume checkpoint and the curves beside it (:func:`live_work_dir`)."""
    Path(checkpoint_path).unlink(missing_ok=True)
    shutil.rmtree(live_work_dir(checkpoint_path), ignore_errors=True)


def live_work_dir(checkpoint_path: str | Path) -> Path:
    """Where dvclive writes during a fit: beside the resume checkpoint (``<name>.live``),
    kept while the checkpoint is, so an interrupted fit that resumes keeps its curves."""
    return Path(checkpoint_path).with_suffix(".live")


def publish_curves(work_dir: Path, live_dir: Path) -> None:
    """Replace ``live_dir`` (atomically) with the curves dvclive wrote to ``work_dir``:
    ``plots/metrics`` only, an empty one before anything is logged."""
    curves = work_dir / "plots" / "metrics"
    with atomic_dir(live_dir) as staging:
        if curves.is_dir():
            shutil.copytree(curves, staging / "plots" / "metrics")
        else:
            (staging / "plots" / "metrics").mkdir(parents=True)


def prune_metric_logs(live_dir: Path, last_step: int) -> None:
    """Drop dvclive rows logged after ``last_step`` (by the run that was interrupted), so a
    resumed run appends without duplicate steps."""
    metrics_dir = live_dir / "plots" / "metrics"
    if not metrics_dir.is_dir():
        return
    for tsv in sorted(metrics_dir.rglob("*.tsv")):
        with open(tsv, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            fieldnames = reader.fieldnames or []
            rows = [row for row in reader if int(row["step"]) <= last_step]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(tsv, out.getvalue())


def _improved(value: float, best: float | None, mode: str) -> bool:
    """Strictly better (ties keep the earlier epoch); NaN is never better."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if mode == "min" else value > best


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _scalar_entries(output: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The scalar entries of a step's output, detached, as float tensors."""
    scalars = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                scalars[key] = value.detach().reshape(()).float()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = torch.tensor(float(value))
    return scalars


def _add_scalars(output: Mapping[str, Any], window: dict, epoch_sums: dict, window_steps: int,
                 epoch_steps: int) -> tuple[int, int]:
    """Add one batch's scalar outputs to the logging window's and the epoch's sums; the
    batch counts of both, one more."""
    for key, value in _scalar_entries(output).items():
        window[key] = window.get(key, 0.0) + value
        epoch_sums[key] = epoch_sums.get(key, 0.0) + value
    return window_steps + 1, epoch_steps + 1


class _TrainingStep(nn.Module):
    """Routes ``forward`` to ``model.training_step``: DistributedDataParallel synchronises
    the gradients of what its wrapped module's ``forward`` computed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.model.training_step(batch)


class _Fit:
    """One call of :func:`fit`: state shared by its phases."""

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset,
        cfg: dict[str, Any],
        live_dir: Path,
        checkpoint_path: Path,
        seed: int,
        monitor: str,
        mode: str,
        collate_fn: Callable | None,
        ctx: DistContext,
        epoch_hook: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
        inputs: Mapping[str, Any] | None = None,
        keep_checkpoint: bool = False,
    ) -> None:
        for name in ("training_step", "validation_step"):
            if not callable(getattr(model, name, None)):
                raise TypeError(f"{type(model).__name__} has no {name}(batch) method; see chestssl/train/loop.py")
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is None or len(data) == 0:
                raise ValueError(f"{name} is empty: nothing to {'train on' if name == 'train_data' else 'validate on'}")
        self.model, self.train_data, self.val_data = model, train_data, val_data
        self.cfg, self.live_dir, self.checkpoint_path = cfg, live_dir, checkpoint_path
        self.live_work_dir = live_work_dir(checkpoint_path)
        self.seed, self.monitor, self.mode, self.collate_fn, self.ctx = seed, monitor, mode, collate_fn, ctx
        self.epoch_hook, self.keep_checkpoint = epoch_hook, keep_checkpoint
        #: ``val/<key>`` whole-pass metrics of the last validation that were not finite (not logged).
        self.undefined_metrics: set[str] = set()
        self.inputs = dict(inputs or {})
        self.device = ctx.device
        self.amp = amp_enabled(cfg["amp"], self.device, announce=ctx.is_main)
        self.amp_dtype = AMP_DTYPES[train_setting(cfg, "amp_dtype")]
        self.epochs_done = 0
        self.global_step = 0
        self.best_value: float | None = None
        self.best_epoch = 0
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.final_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.resumed = False
        self.live = None
        # Time and peak memory of the earlier parts of a resumed fit.
        self.seconds_before, self.peak_before = 0.0, 0
        self.clock = 0.0

    # -- setup ----------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        set_determinism(seed=self.seed + ctx.rank)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model.to(self.device)
        if ctx.distributed and self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters (all have requires_grad=False)")
        self.initial_digest = state_dict_digest(self.model.state_dict()) if ctx.is_main else ""

        # Seeded per epoch: they fix the DataLoader workers' seeds (the sampler has its own).
        self.loader_generator = torch.Generator()
        self.val_generator = torch.Generator()
        self.train_sampler = DistributedSampler(
            self.train_data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=self.seed, drop_last=False
        )
        self.plan = plan_steps(len(self.train_data), cfg, ctx.world_size)
        batch_size = cfg["batch_size"]
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            self.train_data, batch_size=batch_size, sampler=self.train_sampler, num_workers=cfg["num_workers"],
            collate_fn=self.collate_fn, pin_memory=pin, drop_last=self.plan.drop_last, worker_init_fn=seed_worker,
            generator=self.loader_generator,
        )
        self.val_loader = DataLoader(
            self.val_data, batch_size=batch_size, sampler=ShardSampler(len(self.val_data), ctx.world_size, ctx.rank),
            num_workers=cfg["num_workers"], collate_fn=self.collate_fn, pin_memory=pin, worker_init_fn=seed_worker,
            generator=self.val_generator,
        )
        if len(self.train_loader) != self.plan.batches_per_epoch:  # the plan is what the cost estimate uses
            raise RuntimeError(f"the training loader has {len(self.train_loader)} batches per epoch, the step plan "
                               f"{self.plan.batches_per_epoch}")
        self.accumulate = self.plan.accumulate
        self.steps_per_epoch, self.total_steps = self.plan.steps_per_epoch, self.plan.total_steps
        self.optimizer = build_optimizer(self.parameters, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps, self.mode, self.steps_per_epoch)
        # bfloat16 has float32's exponent range: its gradients need no loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)
        self.fingerprint = fingerprint(
            {
                "train config": {key: cfg[key] for key in sorted(cfg)},
                "seed": self.seed,
                "monitor": [self.monitor, self.mode],
                "initial weights": self.initial_digest,
                "dataset sizes": [len(self.train_data), len(self.val_data)],
                # The number of processes sets the data each step sees and the steps per epoch.
                "world size": ctx.world_size,
                **{f"input {name}": value for name, value in sorted(self.inputs.items())},
            }
        )

    def _resume(self) -> None:
        checkpoint, note = None, ""
        if self.ctx.is_main:
            checkpoint, why = load_checkpoint(self.checkpoint_path)
            if checkpoint is not None and checkpoint.get("fingerprint") != self.fingerprint:
                changed = describe_mismatch(checkpoint.get("fingerprint", {}), self.fingerprint)
                note = f"checkpoint {self.checkpoint_path} belongs to a different fit (changed: {changed}); starting fresh"
                checkpoint = None
            elif checkpoint is None and why != "no checkpoint":
                note = f"{why}; starting fresh"
            if note:
                print(note, file=sys.stderr)
        # Every process needs the optimizer/scheduler state and its own RNG state; the
        # model weights reach the other ranks through DDP's broadcast at wrapping.
        shared = None
        if checkpoint is not None:
            shared = {k: v for k, v in checkpoint.items() if k not in ("model", "best_state")}
        shared = broadcast_object(shared, self.ctx)
        if shared is None:
            return
        if self.ctx.is_main:
            self.model.load_state_dict(checkpoint["model"])
            self.best_state = checkpoint["best_state"]
        self.optimizer.load_state_dict(shared["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        self.epochs_done, self.global_step = int(shared["epoch"]), int(shared["global_step"])
        self.best_value = shared["best_value"]
        self.best_epoch, self.best_step = int(shared["best_epoch"]), int(shared["best_step"])
        self.final_metrics = dict(shared["final_metrics"])
        self.history = [dict(h) for h in shared["history"]]
        restore_rng_state(shared["rng"][self.ctx.rank])
        self.seconds_before = float(shared.get("train_seconds", 0.0))
        self.peak_before = int(shared.get("peak_memory_bytes", 0))
        self.resumed = True
        if self.ctx.is_main:
            print(
                f"resuming from {self.checkpoint_path}: {self.epochs_done} epoch(s), {self.global_step} step(s) done",
                file=sys.stderr,
            )

    def _open_live(self) -> None:
        if not self.ctx.is_main:
            return
        from dvclive import Live  # imports DVC: only where it is used

        if self.resumed:
            prune_metric_logs(self.live_work_dir, self.global_step)
        else:
            shutil.rmtree(self.live_work_dir, ignore_errors=True)
        self.live = Live(str(self.live_work_dir), resume=self.resumed, report=None, save_dvc_exp=False,
                         dvcyaml=False)
        self.live.step = self.global_step
        publish_curves(self.live_work_dir, self.live_dir)

    # -- training -------------------------------------------------------------------
    def run(self) -> FitResult:
        self._setup()
        if self.ctx.is_main:
            print(f"world size {self.ctx.world_size} ({self.device.type}); global batch "
                  f"{self.cfg['batch_size'] * self.accumulate * self.ctx.world_size}", file=sys.stderr, flush=True)
        request = cost_probe.cost_request()
        if request is None:
            self._resume()
        self._open_live()
        raw_model = self.model
        if self.ctx.distributed:
            step_module: nn.Module = DistributedDataParallel(
                _TrainingStep(raw_model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(raw_model, "ddp_find_unused_parameters", True),
            )
        else:
            step_module = _TrainingStep(raw_model)
        if request is not None:  # measure a batch's cost, train nothing (chestssl.cost)
            self._measure_cost(step_module, raw_model, request)
            return self._finish(raw_model)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.clock = time.perf_counter()
        try:
            while self.epochs_done < self.cfg["epochs"] and not self._step_limit_reached():
                train_means = self._train_epoch(step_module)
                validated = self._validation_due()
                val_metrics = self._validate(raw_model) if validated else {}
                val_metrics.update(self._run_epoch_hook(raw_model))
                self._end_epoch(raw_model, train_means, val_metrics, validated)
        except BaseException:
            if self.ctx.is_main and self.checkpoint_path.exists():
                print(
                    f"training stopped; rerun the same command to resume from {self.checkpoint_path} "
                    f"(epoch {self.epochs_done})",
                    file=sys.stderr,
                )
            raise
        return self._finish(raw_model)

    def _validation_due(self) -> bool:
        """Whether the epoch just trained is validated: every ``val_every_epochs``-th, and the last
        (by ``epochs`` or ``max_steps``), so the final metrics and the best model always exist."""
        epoch = self.epochs_done + 1
        last = epoch >= self.cfg["epochs"] or self._step_limit_reached()
        return last or epoch % int(train_setting(self.cfg, "val_every_epochs")) == 0

    def _step_limit_reached(self) -> bool:
        return self.cfg["max_steps"] > 0 and self.global_step >= self.cfg["max_steps"]

    def _train_epoch(self, step_module: nn.Module) -> dict[str, float]:
        epoch = self.epochs_done
        self.train_sampler.set_epoch(epoch)
        seed = epoch_seed(self.seed, epoch, self.ctx.rank)
        self.loader_generator.manual_seed(seed)
        if self.cfg["num_workers"] == 0:
            # Random MONAI transforms in the dataset run in this process: seed them per
            # epoch so a resumed run draws what an uninterrupted one would, from the base
            # seed the loader's workers would get, so a run draws the same with or without.
            set_rnd(self.train_data, seed=loader_base_seed(seed))
        self.model.train()
        steps_left = self.total_steps - self.global_step
        bar = tqdm(
            total=min(self.steps_per_epoch, steps_left), desc=f"epoch {epoch + 1}/{self.cfg['epochs']}",
            disable=not self.ctx.is_main, file=sys.stderr, dynamic_ncols=True, leave=True,
        )
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        epoch_sums: dict[str, torch.Tensor] = {}
        epoch_steps = 0
        batches = len(self.train_loader)
        with bar:
            for index, batch in enumerate(self.train_loader):
                position = index % self.accumulate  # within this optimisation step's batches
                if position == 0:
                    if self._step_limit_reached():
                        break
                    self.optimizer.zero_grad(set_to_none=True)
                    group = min(self.accumulate, batches - index)
                last = position == group - 1
                output = self._backward(step_module, batch, group, last)
                if not last:
                    window_steps, epoch_steps = _add_scalars(output, window, epoch_sums, window_steps, epoch_steps)
                    continue
                self._optimizer_step()
                self.global_step += 1
                bar.update(1)
                # After the step, as an output that is a parameter's view reads its new value.
                window_steps, epoch_steps = _add_scalars(output, window, epoch_sums, window_steps, epoch_steps)
                if self.global_step % self.cfg["log_every"] == 0:
                    means = self._reduce_means(window, window_steps)
                    self._log({f"train/{k}": v for k, v in means.items()} | {"lr": self._lr()})
                    bar.set_postfix(loss=f"{means['loss']:.4g}")
                    window, window_steps = {}, 0
        if epoch_steps == 0:
            return {}
        return {f"train/{k}": v for k, v in self._reduce_means(epoch_sums, epoch_steps).items()}

    def _backward(self, step_module: nn.Module, batch: Any, group: int, last: bool) -> Any:
        """Forward and backward pass of one of a step's ``group`` batches; returns the step's output."""
        batch = move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
        # DDP averages gradients across processes at the step's last backward only.
        sync = nullcontext() if last or not hasattr(step_module, "no_sync") else step_module.no_sync()
        with sync:
            with self._autocast():
                output = step_module(batch)
            loss = self._check_output(output)
            self.scaler.scale(loss if group == 1 else loss / group).backward()
        return output

    def _optimizer_step(self) -> None:
        if self.cfg["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None and not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()  # per-step schedules: warm-up, cosine

    def _measure_cost(self, step_module: nn.Module, raw_model: nn.Module, request: CostRequest) -> None:
        """Measure batches instead of training (:mod:`chestssl.train.cost_probe`); rank 0 logs them."""

        def run_batch(batch: Any) -> None:
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(step_module, batch, 1, True)
            self._optimizer_step()

        self.model.train()
        batch_size = request.measured_batch(self.cfg["batch_size"])
        # Full batches, drawn with replacement: a small sample may hold fewer items than a batch.
        loader = DataLoader(
            self.train_data, batch_size=batch_size, collate_fn=self.collate_fn,
            sampler=torch.utils.data.RandomSampler(self.train_data, replacement=True,
                                                   num_samples=batch_size * (request.batches + 1),
                                                   generator=torch.Generator().manual_seed(self.seed)),
        )
        first = next(iter(loader))
        shapes = cost_probe.tensor_shapes(first)
        # Keyed by the full batch's shapes, so a fit measured at a smaller batch (`--max-batch`) is the same fit.
        full_shapes = {name: [self.cfg["batch_size"], *shape[1:]] if shape and shape[0] == batch_size else shape
                       for name, shape in shapes.items()}
        key = cost_probe.measurement_key(raw_model, {**TRAIN_DEFAULTS, **self.cfg}, full_shapes)
        earlier = cost_probe.earlier_measurement(request.log, key)
        if earlier is None:
            measured = cost_probe.measure_batches(run_batch, lambda: loader, request.batches, self.device)
            scale = self.cfg["batch_size"] / batch_size  # FLOPs and time grow linearly with the batch
            measured.update(flops_per_batch=round(measured["flops_per_batch"] * scale),
                            seconds_per_batch=measured["seconds_per_batch"] * scale, measured_batch_size=batch_size)
        else:
            measured = {name: earlier.get(name) for name in
                        ("flops_per_batch", "seconds_per_batch", "timed_batches", "peak_memory_bytes", "memory_kind",
                         "measured_batch_size")}
        if not self.ctx.is_main:
            return
        total, trainable = cost_probe.parameter_counts(raw_model)
        record = {
            "argv": list(sys.argv), "key": key, "reused": earlier is not None, **measured,
            "model": type(raw_model).__name__, "dataset": type(self.train_data).__name__,
            "task": getattr(self.train_data, "task", None), "train_items": len(self.train_data),
            "input_shapes": shapes, "parameters": total, "trainable_parameters": trainable,
            "device": self.device.type, "world_size": self.ctx.world_size, "amp": self.amp,
            "train": {key: self.cfg[key] for key in ("epochs", "batch_size", "max_steps", "amp")}
            | {key: train_setting(self.cfg, key) for key in ("accumulate", "amp_dtype")},
            "steps_here": self.total_steps,
        }
        cost_probe.append_record(request.log, record)

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return nullcontext()

    def _check_output(self, output: Any) -> torch.Tensor:
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError(
                f"{type(self.model).__name__}.training_step must return a dict whose 'loss' is a scalar tensor "
                f"that requires grad; got {type(output).__name__}"
                + (f" with keys {sorted(output)}" if isinstance(output, Mapping) else "")
            )
        return loss.reshape(())

    def _reduce_means(self, sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        """Means over the steps of all processes; stops on a non-finite loss."""
        keys = sorted(sums)
        stacked = torch.stack([sums[k].to(self.device) for k in keys] + [torch.tensor(float(steps), device=self.device)])
        totals = all_reduce_sum(stacked.double(), self.ctx).tolist()
        means = {k: totals[i] / totals[-1] for i, k in enumerate(keys)}
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(
                f"the training loss is {means['loss']} at step {self.global_step} (epoch {self.epochs_done + 1}); "
                "lower train.lr, set train.grad_clip"
                + (", or set train.amp to false" if self.amp else "")
            )
        return means

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log(self, metrics: Mapping[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = self.global_step
        for key, value in metrics.items():
            self.live.log_metric(key, float(value))

    @torch.no_grad()
    def _validate(self, raw_model: nn.Module) -> dict[str, float]:
        """``validation_step`` metrics averaged over all validation samples (all ranks)."""
        raw_model.eval()
        self.val_generator.manual_seed(epoch_seed(self.seed, self.epochs_done, self.ctx.rank, stream=1))
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # per key: a step may leave a metric out for a batch
        with self._autocast():
            for batch in self.val_loader:
                batch = move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
                size = batch_size_of(batch)
                output = raw_model.validation_step(batch)
                if not isinstance(output, Mapping):
                    raise TypeError(
                        f"{type(raw_model).__name__}.validation_step must return a dict of scalar tensors; "
                        f"got {type(output).__name__}"
                    )
                for key, value in _scalar_entries(output).items():
                    sums[key] = sums.get(key, 0.0) + value.double() * size
                    counts[key] = counts.get(key, 0) + size
        # Metrics only defined over a whole pass (global Dice, AUROC) replace the batch
        # averages of the same name. Their accumulators hold this rank's items only, so
        # under DDP the batch averages (gathered over all ranks) are kept instead.
        epoch_end = getattr(raw_model, "validation_epoch_end", None)
        whole_pass = epoch_end() if callable(epoch_end) and self.ctx.world_size == 1 else {}
        raw_model.train()
        local = {key: (float(value), counts[key]) for key, value in sums.items()}
        totals: dict[str, float] = {}
        key_counts: dict[str, int] = {}
        for rank_sums in all_gather_object(local, self.ctx):
            for key, (value, key_count) in rank_sums.items():
                totals[key] = totals.get(key, 0.0) + value
                key_counts[key] = key_counts.get(key, 0) + key_count
        metrics = {f"val/{key}": value / key_counts[key] for key, value in sorted(totals.items())}
        self.undefined_metrics = set()
        for key, value in _scalar_entries(whole_pass).items():
            if torch.isfinite(value):  # e.g. AUROC is undefined when one class was seen
                metrics[f"val/{key}"] = float(value)
            else:  # not logged; as the monitor, it is NaN: never the best (see _finish)
                self.undefined_metrics.add(f"val/{key}")
        return metrics

    def _run_epoch_hook(self, raw_model: nn.Module) -> dict[str, float]:
        if self.epoch_hook is None or not self.ctx.is_main:
            return {}
        rng = capture_rng_state()
        raw_model.eval()
        try:
            with torch.no_grad():
                extra = self.epoch_hook(raw_model, self.epochs_done + 1)
        finally:
            raw_model.train()
            restore_rng_state(rng)
        return {key: float(value) for key, value in (extra or {}).items()}

    def _end_epoch(self, raw_model: nn.Module, train_means: dict[str, float], val_metrics: dict[str, float],
                   validated: bool = True) -> None:
        self.epochs_done += 1
        metrics = {**val_metrics, **train_means}
        # An unvalidated epoch has no monitored value: neither a plateau step nor a best model.
        value = self._monitored_value(metrics) if validated else None
        if value is not None and isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value)
        self._log(val_metrics)
        if self.live is not None:
            self.live.make_summary()
        if value is not None:
            if _improved(value, self.best_value, self.mode):
                self.best_value, self.best_epoch, self.best_step = value, self.epochs_done, self.global_step
                if self.ctx.is_main:
                    self.best_state = _cpu_state(raw_model)
            self.final_metrics = metrics
        self.history.append({"epoch": float(self.epochs_done), "step": float(self.global_step), **metrics})
        self._save_checkpoint(raw_model)

    def _monitored_value(self, metrics: dict[str, float]) -> float:
        """The monitor's value among a validated epoch's ``metrics``; NaN when the whole-pass
        metric was undefined (never the best, see :meth:`_finish`)."""
        if self.monitor in metrics:
            return float(metrics[self.monitor])
        if self.monitor in self.undefined_metrics:
            return math.nan
        if not any(key.startswith("val/") for key in metrics):
            raise ValueError(
                f"validation gave no metrics, so {self.monitor!r} has no value: the validation set holds "
                f"{len(self.val_data)} items in batches of {self.cfg['batch_size']}, and the model scored none of "
                "them (a batch it cannot score is skipped, e.g. Barlow Twins needs 2 items); give the "
                "validation split more items"
            )
        raise KeyError(
            f"monitor {self.monitor!r} is not among the epoch's metrics ({', '.join(sorted(metrics))}); "
            "pass a key that validation_step returns, prefixed with 'val/'"
        )

    def _save_checkpoint(self, raw_model: nn.Module) -> None:
        rng_states = all_gather_object(capture_rng_state(), self.ctx)
        if not self.ctx.is_main:
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "fingerprint": self.fingerprint,
                "epoch": self.epochs_done,
                "global_step": self.global_step,
                "model": raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),
                "best_value": self.best_value,
                "best_epoch": self.best_epoch,
                "best_step": self.best_step,
                "best_state": self.best_state,
                "final_metrics": self.final_metrics,
                "history": self.history,
                "rng": rng_states,
                "train_seconds": self._train_seconds(),
                "peak_memory_bytes": self._peak_memory()[0],
            },
        )

    def _train_seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self.clock if self.clock else 0.0)

    def _peak_memory(self) -> tuple[int, str]:
        peak, kind = cost_probe.peak_memory(self.device)
        return max(peak, self.peak_before), kind

    def _finish(self, raw_model: nn.Module) -> FitResult:
        peak, memory_kind = self._peak_memory()
        best_value = self.best_value
        if self.ctx.is_main:
            if best_value is None or math.isnan(best_value):
                if self.epochs_done > 0:
                    print(f"{self.monitor} was never a number; returning the final weights as the best",
                          file=sys.stderr)
                self.best_state = _cpu_state(raw_model)
                best_value = math.nan
                self.best_epoch, self.best_step = self.epochs_done, self.global_step
            if self.live is not None:
                self.live.end()
                publish_curves(self.live_work_dir, self.live_dir)
            if not self.keep_checkpoint:
                discard_checkpoint(self.checkpoint_path)
        barrier(self.ctx)
        return FitResult(
            best_state=copy.copy(self.best_state) if self.ctx.is_main else None,
            best_value=math.nan if best_value is None else float(best_value),
            best_epoch=self.best_epoch,
            best_step=self.best_step,
            epochs=self.epochs_done,
            steps=self.global_step,
            final_metrics=dict(self.final_metrics),
            monitor=self.monitor,
            mode=self.mode,
            resumed=self.resumed,
            is_main=self.ctx.is_main,
            history=list(self.history),
            train_seconds=self._train_seconds(),
            peak_memory_bytes=peak,
            memory_kind=memory_kind,
            device=self.device.type,
            world_size=self.ctx.world_size,
        )
