"""The cost measurement inside fit (chestssl.train.cost_probe) and the step plan fit trains by."""

from __future__ import annotations

import json

import pytest
import torch

from chestssl.train import cost_probe
from chestssl.train.loop import fit, plan_steps
from tests.train.test_loop import DEVICE, Regression, _quiet_cpu, make_model, train_cfg  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize(
    ("items", "batch_size", "accumulate", "epochs", "max_steps"),
    [(48, 8, 1, 3, 0), (49, 8, 1, 2, 0), (50, 8, 3, 2, 0), (45, 4, 2, 5, 7), (5, 8, 1, 2, 0)],
)
def test_the_step_plan_is_the_steps_fit_takes(tmp_path, items, batch_size, accumulate, epochs, max_steps):
    cfg = train_cfg(epochs=epochs, batch_size=batch_size, accumulate=accumulate, max_steps=max_steps)
    result = fit(make_model(), Regression(items, 1), Regression(8, 2), cfg, tmp_path / "live", tmp_path / "c.pt", 0)
    assert plan_steps(items, cfg).total_steps == result.steps


def test_the_step_plan_drops_a_trailing_single_item_and_splits_items_over_processes():
    cfg = train_cfg(batch_size=8, epochs=1)
    assert plan_steps(49, cfg).batches_per_epoch == 6  # 6 x 8 + 1: the single item is left out
    assert plan_steps(49, cfg).drop_last
    assert plan_steps(50, cfg).batches_per_epoch == 7
    assert plan_steps(104, cfg, world_size=4).batches_per_epoch == 4  # 26 items per process
    assert plan_steps(100, cfg, world_size=4).batches_per_epoch == 3  # 25 = 3 x 8 + 1
    assert plan_steps(104, {**cfg, "accumulate": 3}, world_size=4).steps_per_epoch == 2
    with pytest.raises(ValueError, match="num_items"):
        plan_steps(0, cfg)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_measured_fit_logs_full_batches_flops_and_its_plan_and_trains_nothing_more(tmp_path, monkeypatch):
    log = tmp_path / "cost.jsonl"
    monkeypatch.setenv(cost_probe.LOG_ENV, str(log))
    monkeypatch.setenv(cost_probe.BATCHES_ENV, "2")
    cfg = train_cfg(batch_size=16, epochs=5, accumulate=2)
    model = make_model()
    # 6 items: fewer than a batch; the measured batches are full ones all the same.
    result = fit(model, Regression(6, 1), Regression(4, 2), cfg, tmp_path / "a" / "live", tmp_path / "a.pt", 0)
    assert result.epochs == 0 and result.best_state is not None
    assert (tmp_path / "a" / "live").is_dir()  # the stage's curve output exists
    (record,) = _records(log)
    assert record["input_shapes"] == {"x": [16, 4], "y": [16]}
    # Two linear layers, 4 -> 16 -> 1: 2 FLOPs per multiply-add; forward, and backward for
    # the weights and (second layer only) for its input.
    forward = 2 * 16 * (4 * 16 + 16 * 1)
    assert record["flops_per_batch"] == forward + 2 * 16 * (4 * 16 + 16) + 2 * 16 * 16
    assert record["timed_batches"] == 2 and record["seconds_per_batch"] > 0
    assert record["parameters"] == record["trainable_parameters"] == 4 * 16 + 16 + 16 + 1
    assert record["train_items"] == 6 and record["steps_here"] == plan_steps(6, cfg).total_steps == 5
    assert record["train"]["accumulate"] == 2 and not record["reused"]
    assert record["memory_kind"] == ("cuda_max_allocated" if DEVICE == "cuda" else "process_max_rss")
    assert record["peak_memory_bytes"] > 0 and record["device"] == DEVICE

    # The same model and batch settings on other data: the measurement is reused.
    fit(make_model(), Regression(40, 3), Regression(4, 2), cfg, tmp_path / "b" / "live", tmp_path / "b.pt", 0)
    first, second = _records(log)
    assert second["reused"] and second["key"] == first["key"]
    assert second["seconds_per_batch"] == first["seconds_per_batch"] and second["train_items"] == 40
    # A frozen layer changes what a batch costs: measured again.
    frozen = make_model()
    frozen.net[0].requires_grad_(False)
    fit(frozen, Regression(40, 3), Regression(4, 2), cfg, tmp_path / "c" / "live", tmp_path / "c.pt", 0)
    assert not _records(log)[2]["reused"] and _records(log)[2]["trainable_parameters"] == 17


def test_a_bad_batch_count_is_named(monkeypatch):
    monkeypatch.setenv(cost_probe.LOG_ENV, "x.jsonl")
    monkeypatch.setenv(cost_probe.BATCHES_ENV, "none")
    with pytest.raises(ValueError, match=cost_probe.BATCHES_ENV):
        cost_probe.cost_request()
    monkeypatch.delenv(cost_probe.LOG_ENV)
    assert cost_probe.cost_request() is None


def test_a_batch_larger_than_the_limit_is_measured_smaller_and_scaled(tmp_path, monkeypatch):
    log = tmp_path / "cost.jsonl"
    monkeypatch.setenv(cost_probe.LOG_ENV, str(log))
    monkeypatch.setenv(cost_probe.MAX_BATCH_ENV, "4")
    fit(make_model(), Regression(40, 1), Regression(4, 2), train_cfg(batch_size=16), tmp_path / "live",
        tmp_path / "c.pt", 0)
    (record,) = _records(log)
    assert record["measured_batch_size"] == 4 and record["input_shapes"]["x"] == [4, 4]
    # The FLOPs of the whole batch of 16: linear in the batch.
    assert record["flops_per_batch"] == 16 * (2 * (4 * 16 + 16) + 2 * (4 * 16 + 16) + 2 * 16)
    # The same fit without the limit reuses it: a measurement is keyed by the full batch.
    monkeypatch.setenv(cost_probe.MAX_BATCH_ENV, "0")
    fit(make_model(), Regression(40, 1), Regression(4, 2), train_cfg(batch_size=16), tmp_path / "live2",
        tmp_path / "d.pt", 0)
    second = _records(log)[1]
    assert second["reused"] and second["key"] == record["key"] and second["measured_batch_size"] == 4
    monkeypatch.setenv(cost_probe.MAX_BATCH_ENV, "-1")
    with pytest.raises(ValueError, match=cost_probe.MAX_BATCH_ENV):
        cost_probe.cost_request()
