"""Model files: written with plain values only, read without unpickling code, and every
bad file refused in one line that names it and the stage that writes it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from chestssl.model_files import ModelFileError, load_model_file, save_model_file
from tests.pipeline.conftest import REPO_ROOT


class _RunsCode:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_hostile(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "backbone": {"name": "resnet18"}, "state_dict": _RunsCode(marker)}, path)


def test_a_file_that_runs_code_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "encoder.pt", tmp_path / "ran"
    _write_hostile(path, marker)
    with pytest.raises(ModelFileError) as error:
        load_model_file(path, "pretrain@scratch")
    assert not marker.exists()
    message = str(error.value)
    assert str(path) in message and "pretrain@scratch" in message and "\n" not in message


def test_finetune_refuses_a_hostile_encoder_file_in_one_line(tmp_path):
    """The issue's reproduction: a pickle in models/pretrain/<init>/encoder.pt, then the stage."""
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO_ROOT / "params", tmp_path / "params")
    marker = tmp_path / "ran"
    _write_hostile(tmp_path / "models/pretrain/scratch_swin/encoder.pt", marker)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "stages/finetune.py"), "seg_swinunetr_scratch"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert not marker.exists(), "loading the model file ran its code"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "models/pretrain/scratch_swin/encoder.pt" in errors[0]
    assert "pretrain@scratch_swin" in errors[0]


@pytest.mark.parametrize("content", [b"", b"not a zip archive at all", b"PK\x03\x04truncated"])
def test_a_corrupt_file_names_the_file_and_its_stage(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"model\.pt: not a model file.*finetune@run_a"):
        load_model_file(path, "finetune@run_a")


def test_a_truncated_model_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    save_model_file(path, {"state_dict": {"w": torch.zeros(64, 64)}})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="finetune@run_a"):
        load_model_file(path, "finetune@run_a")


def test_a_missing_file_or_key_says_which_stage_writes_it(tmp_path):
    with pytest.raises(ModelFileError, match=r"not found; .*dvc repro pretrain@ae_swin"):
        load_model_file(tmp_path / "encoder.pt", "pretrain@ae_swin")
    save_model_file(tmp_path / "model.pt", {"state_dict": {}})
    with pytest.raises(ModelFileError, match=r"missing 'encoder'.*finetune@r"):
        load_model_file(tmp_path / "model.pt", "finetune@r", required=("encoder", "state_dict"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="holds a list"):
        load_model_file(tmp_path / "list.pt", "finetune@r")


def test_plain_payloads_round_trip(tmp_path):
    payload = {"format": 1, "config": {"features": [4, 8], "scale": 0.5, "name": "resnet18", "bias": None,
                                       "size": (2, 2), "flag": True},
               "state_dict": OrderedDict(w=torch.arange(6.0).reshape(2, 3))}
    save_model_file(tmp_path / "m.pt", payload)
    loaded = load_model_file(tmp_path / "m.pt", "pretrain@x", required=("state_dict",))
    assert loaded["config"] == payload["config"] and torch.equal(loaded["state_dict"]["w"], payload["state_dict"]["w"])


@pytest.mark.parametrize("bad", [np.float64(1.0), np.int64(3), {1: "int key"}, Path("a"), {"nested": [object()]}])
def test_values_the_reader_would_refuse_are_never_written(tmp_path, bad):
    with pytest.raises(TypeError, match="payload"):
        save_model_file(tmp_path / "m.pt", {"config": bad})
    assert not (tmp_path / "m.pt").exists()


def test_no_model_file_is_read_with_unpickling():
    """Every model file goes through load_model_file: no torch.load that unpickles, anywhere."""
    offenders = [str(path.relative_to(REPO_ROOT)) for folder in ("chestssl", "stages", "tests", "benchmarks")
                 for path in (REPO_ROOT / folder).rglob("*.py")
                 if "weights_only=" + "False" in path.read_text()]
    assert offenders == []

