"""Report table of seed 003's downstream: 3D nodule segmentation, pretrained vs scratch (``runs_3d``).

One row per ``runs_3d`` entry that ``evaluate_3d@<run>`` scored (Dice without background per
scan and over all voxels, per-nodule detection rate, each with its patient-bootstrap
interval), then, for each entry with a ``baseline``, a row of the paired difference
(pretrained - scratch) on the same bootstrap resamples of the same test patients
(:func:`chestssl.eval.seg3d.paired_difference_3d`). Cost columns: the row's ``finetune_3d@`` stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from chestssl.eval.seg3d import load_items_3d, paired_difference_3d
from chestssl.report.tables import Table, format_interval, with_costs

TITLE = "3D nodule segmentation (seed 003's downstream): SwinUNETR 3D, pretrained vs scratch"
#: (metrics key, column header).
COLUMNS_3D = (("dice", "Dice (per scan)"), ("dice_global", "Dice (global)"),
              ("detection_rate", "Nodules found"))


def _protocol_note(params: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]) -> str:
    backbones = {run["init"]: (params["methods"][run["init"]].get("backbone") or {}) for run in runs.values()}
    sizes = sorted({f"{run['crop_size']}^3" for run in runs.values()})
    features = sorted({str(b.get("feature_size")) for b in backbones.values()})
    regions = sorted({"whole volumes" if run["region"] == "volume" else "lung boxes (every slice)"
                      for run in runs.values()})
    limits = sorted({run["max_test_scans"] for run in runs.values()})
    scans = "every test scan" if limits == [0] else f"the first {', '.join(map(str, limits))} test scans"
    overlaps = sorted({f"{run['overlap']:g}" for run in runs.values()})
    return ("Protocol: seed 003 fine-tuned its pretrained Swin UNETR on BTCV's 13 abdominal organs; here the "
            "task is LIDC's nodules (consensus masks at `preprocess.clevel`), background vs nodule. As the seed: "
            "MONAI SwinUNETR 3D, whole network trained, DiceCE, random crops drawn anew every epoch, "
            "sliding-window inference, Dice without the background. This profile: "
            f"{'/'.join(sizes)} crops and windows (seed: 96^3), feature size {'/'.join(features)} (seed: 48), "
            f"windows over {' and '.join(regions)} of {scans}, overlap {'/'.join(overlaps)} (seed: 0.5). A nodule is "
            "found when one of its voxels is predicted.")


def _fill_intervals(number: dict[str, Any], cells: dict[str, str], metrics: Mapping[str, Any]) -> None:
    """Each :data:`COLUMNS_3D` metric of ``metrics`` as CSV numbers (value and interval) and a cell."""
    for key, header in COLUMNS_3D:
        entry = metrics.get(key) or {}
        value, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
        number[key], number[f"{key}_ci_low"], number[f"{key}_ci_high"] = value, low, high
        cells[header] = format_interval(value, low, high)


def read_3d_metrics(params: Mapping[str, Any], evaluate_dir_of: Callable[[str], Path]) -> dict[str, dict[str, Any]]:
    """The test metrics of each ``runs_3d`` entry evaluated in ``evaluate_dir_of(run)``; runs not yet scored are left out."""
    paths = {name: Path(evaluate_dir_of(name)) / "metrics.json" for name in params.get("runs_3d") or {}}
    return {name: json.loads(path.read_text()) for name, path in paths.items() if path.is_file()}


def segmentation_3d_table(
    params: Mapping[str, Any],
    evaluate_dir_of: Callable[[str], Path],
    costs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> tuple[list[Table], list[str]]:
    """(tables, skipped notes) of the ``runs_3d`` entries evaluated in ``evaluate_dir_of(run)``."""
    runs = params.get("runs_3d") or {}
    if not runs:
        return [], ["3D nodule segmentation: `runs_3d` is empty."]
    scored = read_3d_metrics(params, evaluate_dir_of)
    skipped = [f"3D nodule segmentation: run `{name}` has no metrics; run `dvc repro evaluate_3d@{name}`."
               for name in runs if name not in scored]
    if not scored:
        return [], skipped
    numbers, text, keys, footnotes = [], [], [], [_protocol_note(params, runs)]
    for name, metrics in scored.items():
        number = {"entry": name, "init": runs[name]["init"], "test_patients": metrics.get("test_patients"),
                  "test_nodules": metrics.get("test_nodules")}
        cells = {"Run": name, "Init": runs[name]["init"]}
        _fill_intervals(number, cells, metrics)
        cells["Test patients / nodules"] = f"{metrics.get('test_patients')} / {metrics.get('test_nodules')}"
        numbers.append(number)
        text.append(cells)
        keys.append(f"finetune_3d@{name}")
    evaluate = params["evaluate"]
    for name, run in runs.items():
        baseline = run.get("baseline")
        if baseline is None or name not in scored or baseline not in scored:
            continue
        try:
            paired = paired_difference_3d(load_items_3d(Path(evaluate_dir_of(name)) / "items.npz"),
                                          load_items_3d(Path(evaluate_dir_of(baseline)) / "items.npz"),
                                          evaluate["bootstrap_samples"], evaluate["confidence"], int(params["seed"]))
        except (OSError, ValueError) as error:
            skipped.append(f"3D nodule segmentation: `{name}` - `{baseline}` not paired: {error}")
            continue
        label = f"{name} - {baseline}"
        number = {"entry": label, "init": f"{run['init']} - {runs[baseline]['init']}",
                  "test_patients": paired.get("test_patients"), "test_nodules": None}
        cells = {"Run": f"difference: {label}", "Init": number["init"]}
        _fill_intervals(number, cells, paired)
        cells["Test patients / nodules"] = f"{paired.get('test_patients')} (paired)"
        numbers.append(number)
        text.append(cells)
        keys.append(None)
    if any(key is None for key in keys):
        footnotes.append("A difference row is pretrained minus scratch on the same test scans, its interval a paired "
                         "bootstrap over the same resampled patients; an interval that excludes 0 is a difference.")
    table = Table("segmentation_3d", TITLE, pd.DataFrame(numbers), pd.DataFrame(text), footnotes)
    if costs is not None:
        table = with_costs(table, costs, keys)
    return [table], skipped
