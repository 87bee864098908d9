"""params.yaml validation: every problem named with key, value and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from chestssl.params import ParamsError, load_params, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def problems(params: dict) -> list[str]:
    with pytest.raises(ParamsError) as info:
        validate(params)
    return info.value.problems


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params["data"]["source"] == "phantom"
    assert set(params["methods"]) >= {"scratch", "ae"}


def test_full_profile_is_valid_after_merge():
    from chestssl.profiles import merge_profile

    merged = merge_profile(yaml.safe_load((ROOT / "params.yaml").read_text()),
                           yaml.safe_load((ROOT / "params" / "lidc-full.yaml").read_text()))
    params = validate(merged)
    assert params["data"]["source"] == "tcia"
    assert params["slices"]["size"] == 128


def test_unknown_key_is_named_with_the_allowed_keys(raw):
    raw["preprocess"]["spacingg"] = [1, 1, 1]
    (problem,) = problems(raw)
    assert problem.startswith("preprocess.spacingg: unknown key")
    assert "spacing" in problem


def test_wrong_type_and_out_of_range_name_key_value_and_rule(raw):
    raw["methods"]["ae"]["train"]["batch_size"] = "big"
    raw["preprocess"]["clevel"] = 1.5
    raw["runs"]["seg_unetpp_ae"]["loss"] = "l2"
    found = problems(raw)
    assert "methods.ae.train.batch_size: got 'big', expected an integer >= 1" in found
    assert "preprocess.clevel: got 1.5, expected a number > 0 and <= 1" in found
    assert any(p.startswith("runs.seg_unetpp_ae.loss: got 'l2', expected one of 'ce', 'dice', 'focal'") for p in found)


def test_bool_is_not_an_int_and_floats_accept_scientific_strings(raw):
    raw["seed"] = True
    raw["methods"]["ae"]["train"]["lr"] = "1e-3"
    (problem,) = problems(copy.deepcopy(raw))
    assert problem.startswith("seed: got True")
    raw["seed"] = 1
    assert validate(raw)["methods"]["ae"]["train"]["lr"] == pytest.approx(1e-3)


def test_missing_key_and_unknown_method(raw):
    del raw["methods"]["ae"]["loss"]["ssim"]
    raw["methods"]["new"] = {"method": "byol"}
    found = problems(raw)
    assert any(p.startswith("methods.ae.loss.ssim: missing") for p in found)
    assert any(p.startswith("methods.new.method: got 'byol', expected one of") for p in found)


def test_run_init_must_name_a_method_and_split_must_sum_to_one(raw):
    raw["runs"]["seg_unetpp_ae"]["init"] = "nope"
    raw["preprocess"]["split"]["test"] += 0.25
    total = sum(raw["preprocess"]["split"][k] for k in ("train", "val", "test"))
    found = problems(raw)
    assert f"preprocess.split: train + val + test = {total:g}, expected 1" in found
    assert any(p.startswith("runs.seg_unetpp_ae.init: got 'nope'") for p in found)


def test_local_source_needs_a_path(raw):
    raw["data"]["source"] = "local"
    (problem,) = problems(raw)
    assert problem.startswith("data.local.path: empty")
