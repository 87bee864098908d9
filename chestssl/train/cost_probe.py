"""What one training batch costs, measured inside the fit a stage really runs.

:mod:`chestssl.cost` runs every training stage of a profile through ``dvc repro`` with
the environment variable :data:`LOG_ENV` naming a file. :func:`chestssl.train.loop.fit`
then does not train: it builds its loaders, optimiser and schedule as usual, runs one
warm-up batch whose floating-point operations are counted (PyTorch's
``torch.utils.flop_counter.FlopCounterMode``: matrix products, convolutions and
attention, forward and backward; element-wise operations are not counted), then
:data:`BATCHES_ENV` timed batches (default 1), each a forward and backward pass and an
optimiser step. It appends one JSON line per fit to the file (:func:`append_record`)
and returns the weights as they are, so the stage goes on to write its outputs.

Fits that build the same model (same parameter shapes and trainable parameters) with the
same batch settings and input shapes cost the same per batch; the second of them (e.g.
the label fractions of one run) reuses the first one's measurement and only records its
own step plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

#: The JSON-lines file each fit appends its measurement to; unset: fits train.
LOG_ENV = "CHESTSSL_COST_LOG"
#: Timed batches after the warm-up batch (an integer >= 1).
BATCHES_ENV = "CHESTSSL_COST_BATCHES"
#: The largest batch measured (0: no limit). A larger batch is measured at this size and its
#: FLOPs and time scaled by the ratio (both grow linearly with the batch); its peak memory is
#: the smaller batch's, recorded with the size it was measured at.
MAX_BATCH_ENV = "CHESTSSL_COST_MAX_BATCH"


@dataclass(frozen=True)
class CostRequest:
    log: Path
    batches: int
    max_batch: int = 0

    def measured_batch(self, batch_size: int) -> int:
        return batch_size if self.max_batch == 0 else min(batch_size, self.max_batch)


def cost_request() -> CostRequest | None:
    """The measurement the environment asks for, or ``None`` (train as usual)."""
    log = os.environ.get(LOG_ENV)
    if not log:
        return None
    raw = os.environ.get(BATCHES_ENV, "1")
    try:
        batches = int(raw)
    except ValueError:
        batches = 0
    if batches < 1:
        raise ValueError(f"{BATCHES_ENV}: got {raw!r}, expected an integer >= 1")
    raw_max = os.environ.get(MAX_BATCH_ENV, "0")
    try:
        max_batch = int(raw_max)
    except ValueError:
        max_batch = -1
    if max_batch < 0:
        raise ValueError(f"{MAX_BATCH_ENV}: got {raw_max!r}, expected an integer >= 0 (0: no limit)")
    return CostRequest(Path(log), batches, max_batch)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters) of ``model``, shared ones counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


def fit_cost(model: nn.Module, result: Any | None = None) -> dict[str, Any]:
    """What a fit cost (the report shows it beside the scores): parameters, steps, epochs,
    training time and peak memory, from a :class:`~chestssl.train.loop.FitResult`
    (``None``: a model that trained nothing)."""
    total, trainable = parameter_counts(model)
    cost: dict[str, Any] = {"parameters": total, "trainable_parameters": trainable, "steps": 0, "epochs": 0,
                            "train_seconds": 0.0, "peak_memory_gb": None, "memory_kind": None, "device": None,
                            "processes": 1}
    if result is not None:
        cost.update(steps=int(result.steps), epochs=int(result.epochs), train_seconds=round(result.train_seconds, 1),
                    peak_memory_gb=round(result.peak_memory_bytes / 1e9, 3), memory_kind=result.memory_kind,
                    device=result.device, processes=int(result.world_size))
    return cost


def tensor_shapes(batch: Any, prefix: str = "") -> dict[str, list[int]]:
    """The shape of every tensor in a (nested) batch, by its key path."""
    if isinstance(batch, torch.Tensor):
        return {prefix or "batch": list(batch.shape)}
    shapes: dict[str, list[int]] = {}
    if isinstance(batch, Mapping):
        items: Iterable = batch.items()
    elif isinstance(batch, (list, tuple)):
        items = enumerate(batch)
    else:
        return shapes
    for key, value in items:
        shapes.update(tensor_shapes(value, f"{prefix}.{key}" if prefix else str(key)))
    return shapes


def measurement_key(model: nn.Module, cfg: Mapping[str, Any], shapes: Mapping[str, list[int]]) -> str:
    """What fixes a batch's cost: the model's parameters (shapes, trainable or not), the
    batch settings and the input shapes."""
    described = {
        "model": type(model).__name__,
        "parameters": [[name, list(p.shape), p.requires_grad] for name, p in model.named_parameters()],
        "train": {key: cfg.get(key) for key in ("batch_size", "amp", "amp_dtype", "optimizer", "grad_clip")},
        "inputs": {key: shapes[key] for key in sorted(shapes)},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def earlier_measurement(log: Path, key: str) -> dict[str, Any] | None:
    """The first measured record with ``key`` in the log, if any."""
    if not log.is_file():
        return None
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("key") == key and not record.get("reused"):
            return record
    return None


#: Names this process in its records, so that a stage measured again (``make cost`` rerun
#: in its work folder) replaces its earlier records instead of adding to them.
STAGE_RUN = f"{time.time_ns():x}-{os.getpid()}"


def append_record(log: Path, record: Mapping[str, Any]) -> None:
    """One JSON line with :data:`STAGE_RUN`, written with a single ``write`` (stages run one at a time)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**record, "stage_run": STAGE_RUN}, sort_keys=True) + "\n")


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): on CUDA the peak of allocated memory since the last
    ``torch.cuda.reset_peak_memory_stats``; elsewhere the process's peak resident size so far."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "process_max_rss"


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_batches(
    run_batch: Callable[[Any], None], batches: Callable[[], Iterable], count: int, device: torch.device
) -> dict[str, Any]:
    """Count the FLOPs of one warm-up ``run_batch`` and time ``count`` more.

    ``batches()`` starts a pass over the training loader; a pass shorter than
    ``count + 1`` batches is started again.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def endless():
        while True:
            empty = True
            for batch in batches():
                empty = False
                yield batch
            if empty:
                raise ValueError("the training loader yields no batch")

    stream = endless()
    counter = FlopCounterMode(display=False)
    with counter:
        run_batch(next(stream))
    _synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(count):
        batch = next(stream)
        _synchronise(device)
        start = time.perf_counter()
        run_batch(batch)
        _synchronise(device)
        seconds.append(time.perf_counter() - start)
    peak, kind = peak_memory(device)
    return {
        "flops_per_batch": int(counter.get_total_flops()),
        "seconds_per_batch": sum(seconds) / len(seconds),
        "timed_batches": len(seconds),
        "peak_memory_bytes": int(peak),
        "memory_kind": kind,
    }
