"""End to end: the real `dvc repro` of the whole DAG on a tiny profile.

Only what needs a real run runs: the full repro, a second repro that does nothing, one
stage run twice, a bad param, the report of empty ablation lists, each radiograph profile
on a fake tree, one real `dvc exp run -S seg_beta=25` with the run-cache restoring the
earlier results, and one fine-tuning stage on two processes. Which stages a params change
reruns is what dvc.yaml declares, so it is read from `dvc status` and `dvc dag` instead of
rerunning them. The tests run in file order on the one reproduced project; those that
leave stages out of date (the radiograph profiles, the two processes) come last.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from tests.data.test_cxr import build_chestxray14, build_chexpert, build_covid, build_mimic
from tests.pipeline.dvc_checks import (RUN_CACHE_HIT, copy_path, file_digests, out_of_date, out_of_date_after,
                                       ran_stages, restore_params)
from tests.shipped_params import read_shipped_params

pytestmark = pytest.mark.slow

#: The outputs of the `report` stage, under reports/ (dvc.yaml).
REPORT_OUTPUTS = ("README.md", "tables", "figures")


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
    # Seed 003's downstream: each 3D run fine-tuned from its 3D encoder, scored on the test scans by
    # sliding windows, and the pretrained run paired with its scratch baseline in the report's table.
    assert params["runs_3d"]
    for run, entry in params["runs_3d"].items():
        assert (root / "models" / "finetune_3d" / run / "model.pt").is_file()
        assert json.loads((root / "reports" / "finetune_3d" / run / "cost.json").read_text())["steps"] == 2
        metrics = json.loads((root / "reports" / "evaluate_3d" / run / "metrics.json").read_text())
        assert metrics["test_scans"] == 2 and metrics["roi_size"] == entry["crop_size"]
        assert all(metrics[key]["value"] is None or 0.0 <= metrics[key]["value"] <= 1.0
                   for key in ("dice", "dice_global", "detection_rate"))
    assert "3D nodule segmentation (seed 003's downstream)" in report
    assert "difference: seg3d_swinunetr_dae_all_3d - seg3d_swinunetr_scratch_3d" in report
    assert (root / "reports" / "tables" / "segmentation_3d.csv").is_file()
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
        # What each training cost: one record per training, as the fractions' `trained_as` name them.
        cost = json.loads((root / "reports" / "label_fraction" / run / "cost.json").read_text())
        assert set(cost["fits"]) == {entry["trained_as"] for entry in ablation["fractions"].values()}
    for run in params["frozen_parts"]["runs"]:
        ablation = json.loads((root / "reports" / "frozen_parts" / run / "metrics.json").read_text())
        labels = [entry["label"] for entry in sorted(ablation["settings"].values(), key=lambda e: e["unfrozen_stages"])]
        assert labels == ["head", "head + layer4, layer3"], labels
        cost = json.loads((root / "reports" / "frozen_parts" / run / "cost.json").read_text())
        assert set(cost["fits"]) == set(ablation["settings"])
    assert "Label-fraction ablation" in report and "Frozen-parts ablation" in report
    # ... and on the radiographs, as seed 001 ran them: shares of the images, then parts of the encoder.
    for ablation, key in (("label_fraction", "fractions"), ("frozen_parts", "settings")):
        for run in params[ablation]["radiograph_runs"]:
            folder = root / "reports" / f"{ablation}_radiographs" / run
            metrics = json.loads((folder / "metrics.json").read_text())
            assert metrics["task"] == "radiograph_multilabel" and len(metrics[key]) == 2, ablation
            assert all("mean_auroc" in entry for entry in metrics[key].values())
            assert set(json.loads((folder / "cost.json").read_text())["fits"]), ablation
    assert "Seed 001's ablations on radiographs rendered from CT" in report
    assert (root / "reports" / "figures" / "label_fraction_radiographs_radiograph_multilabel.png").exists()
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
    # Every training stage writes what it cost beside its metrics; the report shows it beside the scores.
    trained = [f"pretrain_radiographs/{name}" for name in params["pretrain_radiographs"]["methods"]]
    trained += [f"pretrain_radiograph_studies/{name}" for name in params["pretrain_radiographs"]["study_methods"]]
    trained += ["pretrain_cross_modal/dae_all", "alignment", "latent_diffusion/ae_cnn_attention"]
    for folder in trained:
        assert json.loads((root / "reports" / folder / "cost.json").read_text())["parameters"] > 0, folder
    assert "**Cost columns:**" in report
    alignment = json.loads((root / "reports" / "alignment" / "metrics.json").read_text())
    assert alignment["parameter_error"]["misaligned"]["before_px"] > 0
    assert "STN alignment of radiographs" in report and (root / "reports" / "figures" / "alignment.png").exists()
    # Seeds 001 and 002: classifiers fine-tuned and tested on the radiographs, one aligned by the STN.
    for name, run in params["radiograph_runs"].items():
        finetuned = json.loads((root / "reports" / "finetune_radiographs" / name / "metrics.json").read_text())
        assert finetuned["aligned"] == run["aligned"] and set(finetuned["test"]["auroc"]) == {"nodule", "malignant"}
        assert json.loads((root / "reports" / "finetune_radiographs" / name / "cost.json").read_text())["steps"] > 0
    assert "Classifiers fine-tuned on radiographs rendered from CT (seeds 001, 002)" in report
    # ... with Grad-CAM maps of test radiographs and their confusion counts (seed 001's figures).
    assert "label_confusion" in finetuned["test"]
    for figure in ("radiograph_gradcam.png", "radiograph_confusion_matrices.png"):
        assert (root / "reports" / "figures" / figure).exists() and figure in report
    # Seed 000's latent diffusion: trained on the autoencoder's latents, sampled, scored by FID.
    generated = json.loads((root / "reports" / "evaluate_latent_diffusion" / "ae_cnn_attention" / "metrics.json")
                           .read_text())
    assert generated["fid"]["n_generated"] == params["latent_diffusion"]["ae_cnn_attention"]["samples"]
    assert generated["fid"]["value"] > 0 and "barlow_twins" in generated["feature_network"]
    assert "Seed 000: generation performance by backbone (FID, lower is better)" in report
    assert (root / "reports" / "figures" / "latent_diffusion_samples.png").exists()
    # Training leaves no resume state behind.
    assert not [p for p in (root / "checkpoints").rglob("*") if p.is_file()]
    # Bytecode caches, which Python writes beside the code it imports (unless told not to), are
    # not part of a stage's code dependencies (.dvcignore).
    for package in ("methods", "models", "tasks", "train"):
        cache = root / "chestssl" / package / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / "written_by_an_import.cpython-311.pyc").write_bytes(b"\x00")
    status = reproduced_project.dvc_run("status").stdout
    assert "up to date" in status, status
    again = reproduced_project.dvc_run("repro")
    assert ran_stages(again.stdout) == set() and "Data and pipelines are up to date" in again.stdout, again.stdout
    assert out_of_date(reproduced_project) == set()


def test_changing_the_label_fractions_reruns_only_those_ablations_and_the_report(reproduced_project):
    runs = reproduced_project.params()["label_fraction"]["runs"]
    radiograph_runs = reproduced_project.params()["label_fraction"]["radiograph_runs"]

    def change(params):
        params["label_fraction"]["fractions"] = [0.25, 1.0]

    assert out_of_date_after(reproduced_project, change) == {f"label_fraction@{r}" for r in runs} | {
        f"label_fraction_radiographs@{r}" for r in radiograph_runs} | {"report"}


def test_empty_ablation_lists_rerun_only_the_report_which_says_so(reproduced_project, tmp_path):
    project = reproduced_project

    def change(params):
        for ablation in ("label_fraction", "frozen_parts"):
            params[ablation].update(runs=[], radiograph_runs=[])

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
        assert "label_fraction_radiographs: `label_fraction.radiograph_runs` is empty." in report
        assert "Seed 001's ablations on" not in report
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
    # its latent diffusion model, which diffuses in its latents
    assert method in reproduced_project.params()["latent_diffusion"]
    expected |= {f"latent_diffusion@{method}", f"evaluate_latent_diffusion@{method}"}

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
    """Run again in its own interpreter (the first run was forked from the preload server):
    the same bytes, so the server changes nothing but the start-up."""
    root = reproduced_project.root
    run = next(iter(reproduced_project.params()["runs"]))
    before = (root / "reports" / "finetune" / run / "metrics.json").read_text()
    model = root / "models" / "finetune" / run / "model.pt"
    weights_before = hashlib.sha256(model.read_bytes()).hexdigest()
    curves = file_digests(root, [f"reports/finetune/{run}/live"])
    assert curves
    cost_path = root / "reports" / "finetune" / run / "cost.json"
    cost_before = json.loads(cost_path.read_text())
    reproduced_project.dvc_run("repro", "--force", "--single-item", f"finetune@{run}", preload=False)
    assert (root / "reports" / "finetune" / run / "metrics.json").read_text() == before
    assert hashlib.sha256(model.read_bytes()).hexdigest() == weights_before
    assert file_digests(root, [f"reports/finetune/{run}/live"]) == curves
    # Only what the training cost in time and memory differs; the report shows it, so it alone is stale.
    measured = ("train_seconds", "train_seconds_all_seeds", "peak_memory_gb")
    cost_after = json.loads(cost_path.read_text())
    assert {k: v for k, v in cost_after.items() if k not in measured} == {
        k: v for k, v in cost_before.items() if k not in measured}
    assert out_of_date(reproduced_project) == {"report"}


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


def _multihead_targets(project) -> tuple[list[str], list[str], list[str]]:
    """The evaluation stages of the multihead entries and of the runs fine-tuned from them
    (the stages `seg_beta` reaches end there), the entries and those runs."""
    params = project.params()
    multihead = list(params["multihead"])
    dependent_runs = [name for name, run in params["runs"].items() if run["init"] in multihead]
    assert multihead and dependent_runs
    targets = [f"evaluate_multihead@{m}" for m in multihead] + [f"evaluate@{r}" for r in dependent_runs]
    return targets, multihead, dependent_runs


def test_exp_run_with_seg_beta_then_the_run_cache_restores_the_earlier_results(reproduced_project):
    """`dvc exp run -S seg_beta=25` reruns the multihead stages and their dependents only;
    `dvc metrics diff` and `dvc exp show` show it. Putting seg_beta back, `dvc repro`
    restores every one of those stages from DVC's run-cache byte for byte, without training."""
    project = reproduced_project
    targets, multihead, dependent_runs = _multihead_targets(project)
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


def _build_chestxray14(root: Path) -> None:
    build_chestxray14(root, spread=True)


def _build_covid(root: Path) -> None:
    build_covid(root, nested=True)


#: Per radiograph profile (params/cxr-*.yaml): the builder of a fake tree in its dataset's
#: published layout (tests/data/test_cxr.py), its folder name, and the fine-tuning run taken
#: through the DAG on it (one whose encoder needs no training, to keep the test short).
PROFILE_TREES = {
    "cxr-covid-radiography": (_build_covid, "COVID-19_Radiography_Dataset", "cxr_linear_scratch_resnet18"),
    "cxr-chexpert": (build_chexpert, "CheXpert-v1.0-small", "cxr_densenet121"),
    "cxr-chestxray14": (_build_chestxray14, "ChestX-ray14", "cxr_densenet121"),
    "cxr-mimic-cxr": (build_mimic, "mimic-cxr-jpg", "cxr_densenet121"),
}


def test_each_radiograph_profile_runs_the_dag_on_a_fake_tree_of_its_dataset(reproduced_project, tmp_path):
    """Each profile applied as the README says (its --set naming the dataset's folder), shrunk
    to tiny sizes; then `dvc repro` of the radiographs stage, which imports the tree, and of one
    fine-tuning run on it (with its encoder's stage). Single items, so the test does not train
    every radiograph encoder and the STN again for each profile (the fine-tuning stages depend
    on those folders whole)."""
    root = reproduced_project.root
    shipped = read_shipped_params()["methods"]
    try:
        for profile, (build, folder, run) in PROFILE_TREES.items():
            # The tiny project keeps a few `methods` entries; the profiles name some others of params.yaml.
            params = reproduced_project.params()
            for name in ("scratch_resnet18", "barlow_twins", "scratch_vit", "mae", "diffmae"):
                params["methods"].setdefault(name, shipped[name])
            reproduced_project.write_params(params)
            tree = tmp_path / profile / folder
            tree.mkdir(parents=True)
            build(tree)
            tiny = {"radiographs.side": 64, "data.cxr.val_fraction": 0.34,
                    "pretrain_radiographs.train": "{epochs: 1, batch_size: 4}", "pretrain_radiographs.per_entry": "{}",
                    f"radiograph_runs.{run}.train": "{epochs: 1, batch_size: 4}"}
            settings = [f"data.cxr.root={tree}", *(f"{key}={value}" for key, value in tiny.items())]
            reproduced_project.run(sys.executable, "-m", "chestssl.profiles", f"params/{profile}.yaml",
                                   *(arg for setting in settings for arg in ("--set", setting)))
            init = reproduced_project.params()["radiograph_runs"][run]["init"]
            targets = ["radiographs", *([f"pretrain_radiographs@{init}"] if init else []), f"finetune_radiographs@{run}"]
            ran = ran_stages(reproduced_project.dvc_run("repro", "--single-item", *targets).stdout)
            assert ran == set(targets), (profile, ran)
            imported = json.loads((root / "data" / "radiographs" / "radiographs.json").read_text())
            assert imported["source"] == reproduced_project.params()["data"]["cxr"]["source"], profile
            metrics = json.loads((root / "reports" / "finetune_radiographs" / run / "metrics.json").read_text())
            expected = 4 if profile == "cxr-covid-radiography" else 14
            assert len(metrics["labels"]) == expected and metrics["test"]["n_images"] > 0, profile
            assert (root / "reports" / "finetune_radiographs" / run / "examples.npz").exists(), profile
            restore_params(reproduced_project)
    finally:
        restore_params(reproduced_project)


def test_a_fine_tuning_stage_trains_on_two_gloo_processes_through_params(reproduced_project):
    """`launch.nproc_per_node: 2` makes `dvc repro` start the stage under torchrun: two
    CPU processes (gloo), the data split between them, one set of outputs from rank 0.
    Last in the module: the stage's outputs are then those of two processes."""
    project = reproduced_project
    _, _, dependent_runs = _multihead_targets(project)
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
