"""build_task: one registry keyed by `task`, matching the params schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chestssl.methods import build_method, load_checked_params
from chestssl.params import RunEntry, pretrain_entry
from chestssl.schema import tags
from chestssl.tasks import TASKS, build_task

ROOT = Path(__file__).resolve().parents[2]
BACKBONE = {"name": "unet_encoder", "spatial_dims": 2, "features": [4, 8, 8, 16, 16]}


def test_registry_matches_params_schema():
    assert set(TASKS) == set(tags(RunEntry)) == {"seg", "cls"}


def test_unknown_task_and_bad_payload_are_reported():
    payload = build_method("scratch", {"method": "scratch", "backbone": BACKBONE}, seed=0).export()
    with pytest.raises(ValueError, match=r"runs\.r\.task: got 'det'.*'seg', 'cls'"):
        build_task({"task": "det"}, payload, seed=0, name="r")
    with pytest.raises(ValueError, match=r"encoder of runs\.r\.init \('ae'\): not a ChestSSL encoder"):
        build_task({"task": "cls", "arch": "resnet18", "init": "ae"}, {"state_dict": {}}, seed=0, name="r")


def test_every_run_of_params_yaml_builds():
    params = load_checked_params(ROOT / "params.yaml")
    payloads = {}
    for name in [*params["methods"], *params["multihead"]]:
        payloads[name] = build_method(name, pretrain_entry(params, name)[1], seed=params["seed"]).export()
    image = torch.rand(2, 1, 64, 64)
    for name, run in params["runs"].items():
        task = build_task(run, payloads[run["init"]], seed=params["seed"], name=name)
        prediction = task.predict({"image": image})
        expected = (2, 1, 64, 64) if run["task"] == "seg" else (2,)
        assert tuple(prediction.shape) == expected, name
