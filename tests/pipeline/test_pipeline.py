"""End to end: the real `dvc repro` of the whole DAG on a tiny profile, then experiments.

Only what needs a real run runs: the full repro, a second repro that does nothing, one
stage run twice, a bad param, the report of empty ablation lists and one `dvc exp run`
followed by DVC's run-cache restoring the earlier results. Which stages a params change
reruns is what dvc.yaml declares, so it is read from `dvc status` and `dvc dag` instead
of rerunning them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

#: The outputs of the `report` stage, under reports/ (dvc.yaml).
REPORT_OUTPUTS = ("README.md", "tables", "figures")
#: What DVC logs for a stage that its run-cache restores (dvc/stage/cache.py).
RUN_CACHE_HIT = re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs")


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def out_of_date(project) -> set[str]:
    """The stages `dvc repro` would run: those whose own dependencies `dvc status` finds
    changed, and every stage downstream of one of them in `dvc dag`."""
    changed = set(json.loads(project.dvc_run("status", "--json").stdout or "{}"))
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', project.dvc_run("dag", "--dot").stdout, re.MULTILINE)
    assert edges, "dvc dag --dot printed no edges"
    stale, pending = set(), list(changed)
    while pending:
        stage = pending.pop()
        if stage not in stale:
            stale.add(stage)
            pending.extend(child for parent, child in edges if parent == stage)
    return stale


def params_files(project) -> list[str]:
    """The params files (``params.yaml`` and the ``params`` folder where there is one)."""
    return [name for name in ("params.yaml", "params") if (project.root / name).exists()]


def restore_params(project) -> None:
    """Put the params files back as committed."""
    project.run("git", "checkout", "--", *params_files(project))


def out_of_date_after(project, change) -> set[str]:
    """Apply ``change`` to the params, return :func:`out_of_date`, put the params back."""
    params = project.params()
    change(params)
    project.write_params(params)
    try:
        return out_of_date(project)
    finally:
        restore_params(project)


def copy_path(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of the file or folder ``src``."""
    if dst.is_dir():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def file_digests(root: Path, folders) -> dict[str, str]:
    """SHA-256 of every file under ``folders`` (relative to ``root``), by relative path."""
    digests = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                digests[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


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
    # Seed 001's ablations: metrics per setting, in the report as a figure and tables.
    for run in params["label_fraction"]["runs"]:
        ablation = json.loads((root / "reports" / "label_fraction" / run / "metrics.json").read_text())
        assert sorted(entry["fraction"] for entry in ablation["fractions"].values()) == params["label_fraction"]["fractions"]
        assert all(0.0 <= entry["accuracy"]["value"] <= 1.0 for entry in ablation["fractions"].values())
        for key in ablation["fractions"]:
            assert (root / "reports" / "label_fraction" / run / "live" / key / "plots" / "metrics" / "val"
                    / "loss.tsv").exists(), key
    for run in params["frozen_parts"]["runs"]:
        ablation = json.loads((root / "reports" / "frozen_parts" / run / "metrics.json").read_text())
        labels = [entry["label"] for entry in sorted(ablation["settings"].values(), key=lambda e: e["unfrozen_stages"])]
        assert labels == ["head", "head + layer4, layer3"], labels
    assert "Label-fraction ablation" in report and "Frozen-parts ablation" in report
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
    # Training leaves no resume state behind.
    assert not [p for p in (root / "checkpoints").rglob("*") if p.is_file()]
    status = reproduced_project.dvc_run("status").stdout
    assert "up to date" in status, status
    again = reproduced_project.dvc_run("repro")
    assert ran_stages(again.stdout) == set() and "Data and pipelines are up to date" in again.stdout, again.stdout
    assert out_of_date(reproduced_project) == set()


def test_changing_the_label_fractions_reruns_only_that_ablation_and_the_report(reproduced_project):
    runs = reproduced_project.params()["label_fraction"]["runs"]

    def change(params):
        params["label_fraction"]["fractions"] = [0.25, 1.0]

    assert out_of_date_after(reproduced_project, change) == {f"label_fraction@{r}" for r in runs} | {"report"}


def test_empty_ablation_lists_rerun_only_the_report_which_says_so(reproduced_project, tmp_path):
    project = reproduced_project

    def change(params):
        params["label_fraction"]["runs"] = []
        params["frozen_parts"]["runs"] = []

    assert out_of_date_after(project, change) == {"report"}
    # The report itself, run on those params; then its outputs and the params are put back.
    outputs = [Path("reports") / name for name in REPORT_OUTPUTS]
    for path in outputs:
        copy_path(project.root / path, tmp_path / path)
    params = project.params()
    change(params)
    project.write_params(params)
    try:
        project.run("python", "stages/report.py")
        report = (project.root / "reports" / "README.md").read_text()
        assert "Label-fraction ablation: `label_fraction.runs` is empty." in report
        assert "Frozen-parts ablation: `frozen_parts.runs` is empty." in report
    finally:
        restore_params(project)
        for path in outputs:
            copy_path(tmp_path / path, project.root / path)
    assert out_of_date(project) == set()


def test_changing_one_method_param_reruns_exactly_its_dependents(reproduced_project):
    runs = reproduced_project.params()["runs"]
    method = "ae_cnn_attention"
    ae_runs = [name for name, run in runs.items() if run["init"] == method]
    assert ae_runs
    expected = {f"pretrain@{method}", f"evaluate_pretrain@{method}", "report"}
    expected |= {f"finetune@{r}" for r in ae_runs} | {f"evaluate@{r}" for r in ae_runs}

    def change(params):
        params["methods"][method]["loss"]["l1"] = 2.0

    assert out_of_date(reproduced_project) == set()
    assert out_of_date_after(reproduced_project, change) == expected


def test_changing_one_run_param_reruns_that_run_and_the_report(reproduced_project):
    runs = reproduced_project.params()["runs"]
    # The first run, and a segmentation run (the first may be one).
    for run in {next(iter(runs)), next(name for name, r in runs.items() if r["task"] == "seg")}:

        def change(params):
            params["runs"][run]["loss"] = "dice" if params["runs"][run]["loss"] != "dice" else "ce"

        assert out_of_date_after(reproduced_project, change) == {f"finetune@{run}", f"evaluate@{run}", "report"}


def test_a_stage_run_twice_gives_identical_outputs(reproduced_project):
    root = reproduced_project.root
    run = next(iter(reproduced_project.params()["runs"]))
    before = (root / "reports" / "finetune" / run / "metrics.json").read_text()
    model = root / "models" / "finetune" / run / "model.pt"
    weights_before = hashlib.sha256(model.read_bytes()).hexdigest()
    curves = file_digests(root, [f"reports/finetune/{run}/live"])
    assert curves
    reproduced_project.dvc_run("repro", "--force", "--single-item", f"finetune@{run}")
    assert (root / "reports" / "finetune" / run / "metrics.json").read_text() == before
    assert hashlib.sha256(model.read_bytes()).hexdigest() == weights_before
    assert file_digests(root, [f"reports/finetune/{run}/live"]) == curves
    assert out_of_date(reproduced_project) == set()


def test_a_bad_param_stops_the_stage_with_a_clear_message(reproduced_project):
    params = reproduced_project.params()
    run = next(iter(params["runs"]))
    params["runs"][run]["loss"] = "hinge"
    reproduced_project.write_params(params)
    try:
        result = reproduced_project.run("python", "stages/finetune.py", run, check=False)
        assert result.returncode == 1
        assert f"runs.{run}.loss: got 'hinge', expected one of 'ce', 'dice', 'focal'" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        restore_params(reproduced_project)


def test_exp_run_with_seg_beta_then_the_run_cache_restores_the_earlier_results(reproduced_project):
    """`dvc exp run -S seg_beta=25` reruns the multihead stages and their dependents only;
    `dvc metrics diff` and `dvc exp show` show it. Putting seg_beta back, `dvc repro`
    restores every one of those stages from DVC's run-cache (no training) byte for byte,
    except the report, whose outputs are kept in git (`cache: false`): DVC never
    run-caches a stage with such an output (dvc/stage/__init__.py), so it is rebuilt."""
    project = reproduced_project
    root = project.root
    params = project.params()
    multihead = list(params["multihead"])
    dependent_runs = [name for name, run in params["runs"].items() if run["init"] in multihead]
    assert multihead and dependent_runs
    trained = {f"pretrain_multihead@{m}" for m in multihead} | {f"evaluate_multihead@{m}" for m in multihead}
    trained |= {f"finetune@{r}" for r in dependent_runs} | {f"evaluate@{r}" for r in dependent_runs}
    outputs = [f"{kind}/{m}" for m in multihead for kind in ("models/pretrain", "reports/pretrain",
                                                             "reports/evaluate_pretrain")]
    outputs += [f"{kind}/{r}" for r in dependent_runs for kind in ("models/finetune", "reports/finetune",
                                                                   "reports/evaluate")]
    originals = file_digests(root, outputs)
    assert any("/live/plots/metrics/" in path for path in originals)
    lock = (root / "dvc.lock").read_text()

    result = project.dvc_run("exp", "run", "-S", "seg_beta=25")
    assert ran_stages(result.stdout) == trained | {"report"}, result.stdout
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
    restored = project.dvc_run("repro")
    hits = set(RUN_CACHE_HIT.findall(restored.stdout))
    assert hits == trained, restored.stdout
    assert ran_stages(restored.stdout) == {"report"}, restored.stdout
    assert "epoch 1/" not in restored.stderr, "a restored stage trained"
    assert not [p for p in (root / "checkpoints").rglob("*") if p.is_file()]
    assert file_digests(root, outputs) == originals
    assert (root / "dvc.lock").read_text() == lock
    assert out_of_date(project) == set()
