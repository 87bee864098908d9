"""Model files: the weights one stage writes and another reads.

Model files travel between people (a DVC remote shared by a team), so reading one must
never run code. ``torch.load`` unpickles by default, and a pickle can call anything on
load; every model file is therefore written with only tensors and JSON-able values
(``dict`` with string keys, ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool``,
``None``) and read with ``weights_only=True``, which refuses everything else. One writer
(:func:`save_model_file`) checks the payload before it is written; one reader
(:func:`load_model_file`) turns a missing, corrupt or foreign file into a one-line error
that names the file and the stage that writes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from chestssl.errors import UserError
from chestssl.io import save_torch


class ModelFileError(UserError):
    """A model file that is missing, unreadable, or not what its reader expects."""


def save_model_file(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (tensors and JSON-able values only) atomically to ``path``.

    Raises ``TypeError`` naming the offending entry if anything else is in it, so a
    payload that :func:`load_model_file` would refuse is never written.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"{path}: a model file holds a dict, got {type(payload).__name__}")
    _check_plain(payload, "payload")
    save_torch(path, dict(payload))


def load_model_file(path: str | os.PathLike, writer: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """The dict in the model file ``path``, read without unpickling code.

    ``writer`` names the DVC stage that writes the file (e.g. ``"pretrain@ae_swin"``); every
    error names ``path`` and says to rerun it. ``required`` lists keys the dict must hold.
    """
    import torch

    path = Path(path)
    rerun = f"it is written by the stage {writer}: rerun `dvc repro {writer}` (or `dvc pull` it from the remote)"
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; {rerun}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign, or holding objects other than tensors
        raise ModelFileError(f"{path}: not a model file ChestSSL can read ({_first_line(exc)}); {rerun} "
                             "(model files hold only tensors and plain values and are never unpickled)") from None
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: holds a {type(payload).__name__}, not a ChestSSL model file; {rerun}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise ModelFileError(f"{path}: missing {', '.join(map(repr, missing))}, so it is not the model file "
                             f"expected here; {rerun}")
    return payload


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_plain(value: Any, where: str) -> None:
    from collections import OrderedDict

    import torch

    # Exact types: a subclass (numpy's float64, a YAML library's scalar) pickles as its
    # own class, which the reader refuses.
    if value is None or type(value) in (str, bool, int, float) or isinstance(value, torch.Tensor):
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; model files have string keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    raise TypeError(f"{where}: a {type(value).__module__}.{type(value).__name__}; model files hold only tensors "
                    "and JSON-able values")
