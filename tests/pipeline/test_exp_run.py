"""End to end: one real `dvc exp run -S seg_beta=25`, then DVC's run-cache restoring the
earlier results once `seg_beta` is put back.

The project is the tiny profile's (tests/pipeline/conftest.py) reproduced up to the
multihead models and the run fine-tuned from them only: the stages `seg_beta` reaches
and what they need, not the whole DAG (test_pipeline.py runs that).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.pipeline.conftest import make_project
from tests.pipeline.dvc_checks import RUN_CACHE_HIT, file_digests, ran_stages, restore_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def multihead_project(tmp_path_factory):
    """The tiny project with its multihead stages and their dependent runs reproduced and
    committed; returns (project, targets, the multihead entries, their dependent runs)."""
    project = make_project(tmp_path_factory.mktemp("exp_run") / "project")
    params = project.params()
    multihead = list(params["multihead"])
    dependent_runs = [name for name, run in params["runs"].items() if run["init"] in multihead]
    assert multihead and dependent_runs
    targets = [f"evaluate_multihead@{m}" for m in multihead] + [f"evaluate@{r}" for r in dependent_runs]
    project.dvc_run("repro", *targets)
    project.commit("reproduced the multihead stages")
    return project, targets, multihead, dependent_runs


def test_exp_run_with_seg_beta_then_the_run_cache_restores_the_earlier_results(multihead_project):
    """`dvc exp run -S seg_beta=25` reruns the multihead stages and their dependents only;
    `dvc metrics diff` and `dvc exp show` show it. Putting seg_beta back, `dvc repro`
    restores every one of those stages from DVC's run-cache byte for byte, without training."""
    project, targets, multihead, dependent_runs = multihead_project
    root = project.root
    params = project.params()
    trained = {f"pretrain_multihead@{m}" for m in multihead} | {f"evaluate_multihead@{m}" for m in multihead}
    trained |= {f"finetune@{r}" for r in dependent_runs} | {f"evaluate@{r}" for r in dependent_runs}
    outputs = [f"{kind}/{m}" for m in multihead for kind in ("models/pretrain", "reports/pretrain",
                                                             "reports/evaluate_pretrain")]
    outputs += [f"{kind}/{r}" for r in dependent_runs for kind in ("models/finetune", "reports/finetune",
                                                                   "reports/evaluate")]
    originals = file_digests(root, outputs)
    assert any("/live/plots/metrics/" in path for path in originals)
    lock = (root / "dvc.lock").read_text()

    result = project.dvc_run("exp", "run", "-S", "seg_beta=25", *targets)
    assert ran_stages(result.stdout) == trained, result.stdout
    for name in multihead:
        metrics = json.loads((root / "reports" / "evaluate_pretrain" / name / "metrics.json").read_text())
        if params["multihead"][name]["seg_beta"] is None:
            assert metrics["seg_beta"] == 25.0
    diff = json.loads(project.dvc_run("metrics", "diff", "--json").stdout or "{}")
    for name in multihead:
        assert diff.get(f"reports/evaluate_pretrain/{name}/metrics.json", {}).get("seg_beta", {}).get("new") == 25.0, diff
    assert any(run in path for path in diff for run in dependent_runs), diff
    shown = project.dvc_run("exp", "show", "--json").stdout
    assert re.search(r'"seg_beta":\s*25', shown), shown[:2000]
    assert file_digests(root, outputs) != originals

    restore_params(project)
    restored = project.dvc_run("repro", *targets)
    assert set(RUN_CACHE_HIT.findall(restored.stdout)) == trained, restored.stdout
    assert ran_stages(restored.stdout) == set(), restored.stdout
    assert "epoch 1/" not in restored.stderr, "a restored stage trained"
    assert not [p for p in (root / "checkpoints").rglob("*") if p.is_file()]
    assert file_digests(root, outputs) == originals
    assert (root / "dvc.lock").read_text() == lock
    assert "up to date" in project.dvc_run("status", *targets).stdout


def test_a_fine_tuning_stage_trains_on_two_gloo_processes_through_params(multihead_project):
    """`launch.nproc_per_node: 2` makes `dvc repro` start the stage under torchrun: two
    CPU processes (gloo), the data split between them, one set of outputs from rank 0."""
    project, _, _, dependent_runs = multihead_project
    run = dependent_runs[0]
    params = project.params()
    params["launch"]["nproc_per_node"] = 2
    project.write_params(params)
    try:
        # torchrun's workers start their own interpreters: a preload server would idle beside them.
        result = project.dvc_run("repro", "--single-item", f"finetune@{run}", preload=False)
        output = result.stdout + result.stderr
        assert f"Running stage 'finetune@{run}'" in output, output
        assert "launch: -m torch.distributed.run --nproc-per-node 2 --standalone" in output, output
        assert "world size 2 (cpu)" in output and "world size 1" not in output, output
        metrics = json.loads((project.root / "reports" / "finetune" / run / "metrics.json").read_text())
        assert metrics["steps"] > 0
        lock = project.root / "dvc.lock"
        assert "nproc_per_node: 2" in lock.read_text(), "the process count is recorded with the run"
        assert "up to date" in project.dvc_run("status", f"finetune@{run}").stdout
    finally:
        restore_params(project)
