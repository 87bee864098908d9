"""Resume checkpoints: the training state saved after every epoch, and its fingerprint.

A checkpoint holds everything the next epoch depends on (model, optimizer, scheduler,
AMP scaler, epoch and step counters, the best weights so far, every process's random
number generator states), so an interrupted fit that resumes from it ends with the same
weights as one that ran through. Its fingerprint is a hash of what defines the fit (the
``train`` params, the stage's whole params entry, the bytes of every input file the stage
reads, the seed, the monitored metric, the initial weights, the dataset sizes, the number
of processes): a checkpoint of a different fit, or of the same fit on other data, is
never resumed.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from chestssl.io import file_sha256, save_torch

CHECKPOINT_FORMAT = 1


def digest(value: Any) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted), as hex."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors."""
    sha = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        sha.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            sha.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            sha.update(repr(value).encode())
    return sha.hexdigest()


def files_digest(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the relative names and bytes of every file under ``paths`` (files or
    folders, walked in sorted order); a missing path counts as such.

    Content, not modification times: data restored with its old times (``cp -p``,
    ``rsync -t``) or rewritten to the same size is still told apart.
    """
    sha = hashlib.sha256()
    for root in sorted(Path(p) for p in paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            sha.update(f"{path.as_posix()}\0".encode())
            sha.update((file_sha256(path) if path.is_file() else "missing").encode())
    return sha.hexdigest()


def fingerprint(parts: Mapping[str, Any]) -> dict[str, str]:
    """One digest per named part, so a mismatch can say which part changed."""
    return {name: digest(value) for name, value in parts.items()}


def describe_mismatch(saved: Mapping[str, str], current: Mapping[str, str]) -> str:
    changed = sorted(name for name in set(saved) | set(current) if saved.get(name) != current.get(name))
    return ", ".join(changed)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's GPU only: touching the others would open a context on each.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _to_plain(python_state: tuple) -> list:
    version, internal, gauss = python_state
    return [version, list(internal), gauss]


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a killed write leaves the previous one intact)."""
    save_torch(path, {"format": CHECKPOINT_FORMAT, **checkpoint})


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """Read a checkpoint; returns (checkpoint or None, why it is None).

    Only tensors and plain containers are unpickled (``weights_only``), so a checkpoint
    file cannot run code.
    """
    path = Path(path)
    if not path.exists():
        return None, "no checkpoint"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start fresh, and say so
        return None, f"{path} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        return None, f"{path} is not a checkpoint of this version of chestssl"
    return checkpoint, ""


def stage_inputs(params: Mapping[str, Any], data: Iterable[str | Path]) -> dict[str, Any]:
    """The ``inputs`` a stage hands :func:`chestssl.train.loop.fit`: the params it reads
    (its whole entry and the shared keys it uses) and a digest of the data files it reads."""
    return {"params": params, "data": files_digest(data)}
