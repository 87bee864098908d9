"""End to end: the real `dvc repro` of the whole DAG on a tiny profile, then experiments."""

from __future__ import annotations

import hashlib
import json

import pytest

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def stages_that_would_run(project) -> set[str]:
    """Stages whose own dependencies changed (what `dvc repro --dry` lists)."""
    return ran_stages(project.dvc_run("repro", "--dry").stdout)


def repro_with_params(project, change, inspect=None) -> set[str]:
    """Apply ``change`` to params.yaml, `dvc repro`, call ``inspect(project)`` if given,
    and return the stages that ran.

    params.yaml is restored and the pipeline reproduced again afterwards, so the next
    test starts from the committed state.
    """
    params = project.params()
    change(params)
    project.write_params(params)
    try:
        ran = ran_stages(project.dvc_run("repro").stdout)
        if inspect is not None:
            inspect(project)
        return ran
    finally:
        project.run("git", "checkout", "params.yaml")
        project.dvc_run("repro")


def test_repro_builds_the_report_and_a_second_repro_does_nothing(reproduced_project):
    root = reproduced_project.root
    report = (root / "reports" / "README.md").read_text()
    params = reproduced_project.params()
    for run in params["runs"]:
        assert run in report
        metrics = json.loads((root / "reports" / "evaluate" / run / "metrics.json").read_text())
        key = "dice_global" if params["runs"][run]["task"] == "seg" else "accuracy"
        assert 0.0 <= metrics[key]["value"] <= 1.0
    assert list((root / "reports" / "figures").glob("*.png"))
    # Every pretrained encoder is probed the same way, the 3D one on crops, during and after training.
    assert "Linear probe of every pretrained encoder" in report and "swin 3D" in report
    for method, entry in params["methods"].items():
        probe = json.loads((root / "reports" / "evaluate_pretrain" / method / "metrics.json").read_text())["probe"]
        nodule = probe["nodule"]
        # A few 3D crops may all fall on one side (the probe then says why it skipped).
        assert "skipped" in nodule if "auroc" not in nodule else 0.0 <= nodule["auroc"]["value"] <= 1.0, method
        if entry["method"] != "scratch":
            assert (root / "reports" / "pretrain" / method / "live" / "plots" / "metrics" / "probe"
                    / "mean_auroc.tsv").exists(), method
    # Seed 001's studies: metrics per setting, in the report as a figure and tables.
    for run in params["label_fraction"]["runs"]:
        study = json.loads((root / "reports" / "label_fraction" / run / "metrics.json").read_text())
        assert sorted(entry["fraction"] for entry in study["fractions"].values()) == params["label_fraction"]["fractions"]
        assert all(0.0 <= entry["accuracy"]["value"] <= 1.0 for entry in study["fractions"].values())
    for run in params["frozen_parts"]["runs"]:
        study = json.loads((root / "reports" / "frozen_parts" / run / "metrics.json").read_text())
        labels = [entry["label"] for entry in sorted(study["settings"].values(), key=lambda e: e["unfrozen_stages"])]
        assert labels == ["head", "head + layer4, layer3"], labels
    assert "Label-fraction study" in report and "Frozen-parts study" in report
    assert (root / "reports" / "figures" / "label_fraction_cls.png").exists()
    assert "Grad-CAM" in report and "confusion matrices" in report.lower()
    assert "Downstream results by pretraining method" in report
    # Radiographs rendered from CT, and the methods pretrained on them with their probe.
    assert (root / "data" / "radiographs" / "studies.csv").exists() and "Radiographs rendered from CT" in report
    for name in params["pretrain_radiographs"]["methods"]:
        probe = json.loads((root / "reports" / "pretrain_radiographs" / name / "metrics.json").read_text())["probe"]
        assert "auroc" in probe["nodule"] or "skipped" in probe["nodule"], name
    assert "Pretraining on radiographs rendered from CT" in report
    for name in params["pretrain_radiographs"]["study_methods"]:
        study = json.loads((root / "reports" / "pretrain_radiograph_studies" / name / "metrics.json").read_text())
        assert study["level"] == "study" and study["trained"], name
        assert "auroc" in study["probe"]["nodule"] or "skipped" in study["probe"]["nodule"], name
    assert "Study-level linear probe of each encoder pretrained on radiograph studies" in report
    assert (root / "reports" / "figures" / "radiograph_probe_curves.png").exists()
    # Seed 003's cross-modal term: the DAE on CT slices and radiographs, probed with its CT-only twin.
    assert params["cross_modal"]["methods"] == ["dae_all"]
    crossed = json.loads((root / "reports" / "pretrain_cross_modal" / "dae_all" / "metrics.json").read_text())
    assert crossed["mm_con_active_steps"] > 0 and set(crossed["probe"]) == {"cross_modal", "ct_only"}
    assert "Cross-modal contrastive term: DAE on CT slices and radiographs rendered from CT" in report
    assert "Linear probe on radiographs: DAE on CT only vs on CT + radiographs" in report
    alignment = json.loads((root / "reports" / "alignment" / "metrics.json").read_text())
    assert alignment["parameter_error"]["misaligned"]["before_px"] > 0
    assert "STN alignment of radiographs" in report and (root / "reports" / "figures" / "alignment.png").exists()
    status = reproduced_project.dvc_run("status").stdout
    assert "up to date" in status, status
    assert stages_that_would_run(reproduced_project) == set()


def test_changing_the_label_fractions_reruns_only_that_study_and_the_report(reproduced_project):
    runs = reproduced_project.params()["label_fraction"]["runs"]

    def change(params):
        params["label_fraction"]["fractions"] = [0.25, 1.0]

    assert repro_with_params(reproduced_project, change) == {f"label_fraction@{r}" for r in runs} | {"report"}


def test_empty_study_lists_rerun_only_the_report_which_says_so(reproduced_project):
    def inspect(project):
        report = (project.root / "reports" / "README.md").read_text()
        assert "Label-fraction study: `label_fraction.runs` is empty." in report
        assert "Frozen-parts study: `frozen_parts.runs` is empty." in report

    def change(params):
        params["label_fraction"]["runs"] = []
        params["frozen_parts"]["runs"] = []

    assert repro_with_params(reproduced_project, change, inspect) == {"report"}
    assert stages_that_would_run(reproduced_project) == set()


def test_changing_one_method_param_reruns_exactly_its_dependents(reproduced_project):
    runs = reproduced_project.params()["runs"]
    method = "ae_cnn_attention"
    ae_runs = [name for name, run in runs.items() if run["init"] == method]
    assert ae_runs
    expected = {f"pretrain@{method}", f"evaluate_pretrain@{method}", "report"}
    expected |= {f"finetune@{r}" for r in ae_runs} | {f"evaluate@{r}" for r in ae_runs}

    def change(params):
        params["methods"][method]["loss"]["l1"] = 2.0

    assert stages_that_would_run(reproduced_project) == set()
    assert repro_with_params(reproduced_project, change) == expected


def test_changing_one_run_param_reruns_that_run_and_the_report(reproduced_project):
    run = next(iter(reproduced_project.params()["runs"]))

    def change(params):
        params["runs"][run]["train"]["lr"] = 0.005

    assert repro_with_params(reproduced_project, change) == {f"finetune@{run}", f"evaluate@{run}", "report"}


def test_a_stage_run_twice_gives_identical_outputs(reproduced_project):
    root = reproduced_project.root
    run = next(iter(reproduced_project.params()["runs"]))
    before = (root / "reports" / "finetune" / run / "metrics.json").read_text()
    model = root / "models" / "finetune" / run / "model.pt"
    weights_before = hashlib.sha256(model.read_bytes()).hexdigest()
    reproduced_project.dvc_run("repro", "--force", "--single-item", f"finetune@{run}")
    assert (root / "reports" / "finetune" / run / "metrics.json").read_text() == before
    assert hashlib.sha256(model.read_bytes()).hexdigest() == weights_before
    assert stages_that_would_run(reproduced_project) == set()


def test_a_bad_param_stops_the_stage_with_a_clear_message(reproduced_project):
    params = reproduced_project.params()
    run = next(iter(params["runs"]))
    params["runs"][run]["train"]["lr"] = -1
    reproduced_project.write_params(params)
    try:
        result = reproduced_project.run("python", "stages/finetune.py", run, check=False)
        assert result.returncode == 1
        assert f"runs.{run}.train.lr: got -1" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        reproduced_project.run("git", "checkout", "params.yaml")


def test_exp_run_with_a_finetune_param_and_metrics_diff(reproduced_project):
    run = next(name for name, r in reproduced_project.params()["runs"].items() if r["task"] == "seg")
    # A value no earlier test used, so DVC's run cache cannot answer for it.
    result = reproduced_project.dvc_run("exp", "run", "-S", f"runs.{run}.train.lr=0.003")
    ran = ran_stages(result.stdout)
    assert ran == {f"finetune@{run}", f"evaluate@{run}", "report"}, result.stdout
    diff = json.loads(reproduced_project.dvc_run("metrics", "diff", "--json").stdout or "{}")
    changed = [path for path in diff if run in path]
    assert changed, diff
    shown = reproduced_project.dvc_run("exp", "show", "--json").stdout
    assert "0.003" in shown


def test_exp_run_with_seg_beta_reruns_only_multihead_stages_and_their_dependents(reproduced_project):
    params = reproduced_project.params()
    multihead = list(params["multihead"])
    dependent_runs = [name for name, run in params["runs"].items() if run["init"] in multihead]
    assert multihead and dependent_runs
    expected = {f"pretrain_multihead@{m}" for m in multihead} | {f"evaluate_multihead@{m}" for m in multihead}
    expected |= {f"finetune@{r}" for r in dependent_runs} | {f"evaluate@{r}" for r in dependent_runs} | {"report"}
    result = reproduced_project.dvc_run("exp", "run", "-S", "seg_beta=25")
    assert ran_stages(result.stdout) == expected, result.stdout
    root = reproduced_project.root
    for name in multihead:
        metrics = json.loads((root / "reports" / "evaluate_pretrain" / name / "metrics.json").read_text())
        if params["multihead"][name]["seg_beta"] is None:
            assert metrics["seg_beta"] == 25.0
