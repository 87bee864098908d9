"""Stage frozen_parts: a run trained with its head only, then with more of its encoder (seed 001)."""

from __future__ import annotations

import json

import pytest

from chestssl.params import ParamsError
from chestssl.pipeline.frozen_parts import frozen_parts
from tests.pipeline.test_label_fraction import ablation_inputs  # noqa: F401 (a fixture)


def test_each_setting_names_and_trains_its_stages(ablation_inputs):  # noqa: F811
    params, where = ablation_inputs
    metrics = frozen_parts(params, "r", **where)
    assert json.loads((where["report_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["encoder_stages"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    head_only, deeper = metrics["settings"]["unfrozen_0"], metrics["settings"]["unfrozen_2"]
    assert head_only["label"] == "head" and deeper["trained"] == ["layer4", "layer3"]
    assert deeper["trainable_parameters"] > head_only["trainable_parameters"]
    assert {"accuracy", "auroc"} <= set(deeper)
    assert not where["state_dir"].exists()


def test_each_setting_writes_what_its_training_cost(ablation_inputs):  # noqa: F811
    from tests.pipeline.cost_checks import check_cost_record

    params, where = ablation_inputs
    metrics = frozen_parts(params, "r", **where)
    cost = json.loads((where["report_dir"] / "cost.json").read_text())
    assert set(cost) == {"fits"} and sorted(cost["fits"]) == sorted(metrics["settings"]) == ["unfrozen_0", "unfrozen_2"]
    for key, fit in cost["fits"].items():
        check_cost_record(fit, steps=2)  # train.max_steps
        assert fit["trainable_parameters"] == metrics["settings"][key]["trainable_parameters"]
    head_only, deeper = cost["fits"]["unfrozen_0"], cost["fits"]["unfrozen_2"]
    # The frozen parts count among the parameters, not among the trained ones.
    assert head_only["parameters"] == deeper["parameters"] > deeper["trainable_parameters"]
    assert deeper["trainable_parameters"] > head_only["trainable_parameters"]


def test_a_run_not_listed_or_too_many_stages_are_refused(ablation_inputs):  # noqa: F811
    params, where = ablation_inputs
    params["frozen_parts"]["unfrozen_stages"] = [0, 7]
    with pytest.raises(ParamsError, match=r"frozen_parts.unfrozen_stages: .*\[7\] exceed the 5 stages"):
        frozen_parts(params, "r", **where)
    params["frozen_parts"]["runs"] = []
    with pytest.raises(ParamsError, match="frozen_parts.runs: 'r' is not listed"):
        frozen_parts(params, "r", **where)
