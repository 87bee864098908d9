"""The pretrained-vs-scratch table: paired differences with patient-bootstrap intervals.

One row per (scratch run, pretrained run, metric), from the results of
:func:`chestssl.eval.paired.paired_difference` with ``a`` the scratch run and ``b`` the
pretrained run (runs paired by :func:`chestssl.eval.paired.scratch_pairs`). The CSV keeps
every number in its own column; the Markdown shows ``+0.034 [+0.010, +0.058]``.

The paired bootstrap compares the two runs' first training seeds. When both runs were
trained with several seeds (``training_seeds``), seed ``k`` of one is paired with seed ``k``
of the other, and the table adds the mean and standard deviation of those differences; a
verdict then also needs every seed's difference to have the interval's sign, since a
difference that flips between training runs is not one that pretraining made.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from chestssl.eval.paired import PAIRED_METRICS
from chestssl.report.tables import CLASSIFICATION_COLUMNS, SEGMENTATION_COLUMNS, Column, Table

TABLE_NAME = "pretrained_vs_scratch"
TABLE_TITLE = "Pretrained vs scratch: paired differences (test split)"
#: Header of the difference column; the Markdown header carries the table's first footnote.
DIFFERENCE_HEADER = "Difference [CI]"
#: Verdicts of ``paired_difference`` (``a`` = scratch, ``b`` = pretrained) as shown.
VERDICT_TEXT = {
    "b better": "pretrained better",
    "a better": "scratch better",
    "no clear difference": "no clear difference",
    "undefined": "undefined",
}
#: The value of a metric that guessing reaches whatever the classes' balance (AUROC: a
#: random score). A run at or below it has learnt nothing about the label, so a verdict
#: naming it better is qualified (accuracy and F1 have no such fixed level).
CHANCE_LEVEL = {"auroc": 0.5}
_COLUMNS: dict[str, Column] = {c.key: c for c in (*SEGMENTATION_COLUMNS, *CLASSIFICATION_COLUMNS)}
_RESULT_KEYS = ("a", "b", "difference", "ci_low", "ci_high", "verdict")


def _number(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _method_footnote(results: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    settings = set()
    for pair, result in results.items():
        if not isinstance(result.get("confidence"), (int, float)) or not isinstance(result.get("n_bootstrap"), int):
            raise ValueError(
                f"pair {pair}: the result lacks numeric `confidence` and `n_bootstrap`; pass the result of "
                "chestssl.eval.paired.paired_difference"
            )
        settings.add((float(result["confidence"]), int(result["n_bootstrap"]), result.get("seed")))
    described = "; ".join(
        f"{confidence:.0%} interval, {n_bootstrap} resamples" + (f", seed {seed}" if seed is not None else "")
        for confidence, n_bootstrap, seed in sorted(settings, key=str)
    )
    return (
        "Difference = pretrained - scratch on the same test slices, with a percentile interval from a paired "
        f"bootstrap over test patients ({described}): each resample draws the test patients with replacement and "
        "recomputes both runs' metrics on the same drawn patients, so the interval is of the difference itself. "
        "The verdict names a better run only when the interval excludes 0. The interval compares each run's "
        "first training seed, so the variation between training runs is not in it; where the runs were trained "
        "with several seeds, *Over seeds* gives the mean ± sd of the differences of seed k with seed k, and a "
        "verdict also needs every seed's difference to have the interval's sign. A run named better whose AUROC "
        "is at or below 0.5 (a random score) is said to be: it beats a baseline that guesses worse than chance, "
        "which shows nothing about pretraining."
    )


def seed_differences(scratch: Mapping[str, Any] | None, pretrained: Mapping[str, Any] | None,
                     metric: str) -> list[float] | None:
    """Pretrained - scratch of ``metric`` for each training seed ``k`` of both runs, from their
    metrics' ``training_seeds`` summaries (:func:`chestssl.eval.downstream.spread_over_training_seeds`);
    ``None`` unless both have at least two seeds; seeds where either value is undefined are left out."""
    if not scratch or not pretrained:
        return None
    a = ((scratch.get("metrics") or {}).get(metric) or {}).get("values") or []
    b = ((pretrained.get("metrics") or {}).get(metric) or {}).get("values") or []
    if min(len(a), len(b)) < 2:
        return None
    return [y - x for x, y in zip(a, b) if x is not None and y is not None]


def _seed_verdict(verdict: str, differences: list[float] | None) -> str:
    """The paired verdict, kept only where every seed's difference has its sign."""
    if differences is None or verdict not in ("a better", "b better"):
        return verdict
    sign = 1.0 if verdict == "b better" else -1.0
    return verdict if differences and all(sign * d > 0 for d in differences) else "no clear difference"


def verdict_text(verdict: str, metric: str, scratch: float | None, pretrained: float | None) -> str:
    """The verdict as shown: a run named better at or below the metric's chance level
    (:data:`CHANCE_LEVEL`) is said to be so, since beating a worse-than-guessing baseline
    shows nothing about pretraining."""
    text = VERDICT_TEXT.get(verdict, verdict)
    better = {"b better": pretrained, "a better": scratch}.get(verdict)
    chance = CHANCE_LEVEL.get(metric)
    if chance is not None and better is not None and better <= chance:
        text += f", but at or below chance ({chance:g})"
    return text


def pretrained_vs_scratch_table(
    results: Mapping[tuple[str, str], Mapping[str, Any]], run_params: Mapping[str, Mapping[str, Any]],
    seed_spreads: Mapping[str, Mapping[str, Any]] | None = None,
) -> Table:
    """The table of paired differences.

    Args:
        results: ``(scratch run, pretrained run)`` -> the result of
            :func:`~chestssl.eval.paired.paired_difference` with ``a`` = scratch run,
            ``b`` = pretrained run.
        run_params: run -> its ``runs.<run>`` params (for the pretrained run's ``init``).
        seed_spreads: run -> its metrics' ``training_seeds`` summary, for runs trained with
            several seeds (columns ``seed_difference_mean``, ``seed_difference_sd``,
            ``training_seeds``; Markdown "Over seeds").

    Returns:
        A :class:`~chestssl.report.tables.Table` named ``pretrained_vs_scratch``; CSV
        columns ``scratch_run``, ``pretrained_run``, ``pretrained_init``, ``task``,
        ``metric``, ``scratch``, ``pretrained``, ``difference``, ``difference_ci_low``,
        ``difference_ci_high``, ``verdict``, ``n_items``, ``n_patients``, ``notes``.

    Raises:
        ValueError: ``results`` is empty, or a result lacks what the table needs.
        KeyError: a run has no params.
    """
    if not results:
        raise ValueError("no pretrained-vs-scratch pairs to tabulate (no two runs differ only in their initial weights)")
    seed_spreads = seed_spreads or {}
    footnotes = [_method_footnote(results)]
    prefix = TABLE_NAME.replace("_", "-")
    cell_notes: list[str] = []
    number_rows, text_rows = [], []
    for (scratch, pretrained), result in sorted(results.items()):
        for run in (scratch, pretrained):
            if run not in run_params:
                raise KeyError(f"run {run!r} is in a pretrained-vs-scratch pair but has no params; pass runs.{run}")
        task = result.get("task")
        if task not in PAIRED_METRICS:
            raise ValueError(
                f"pair ({scratch}, {pretrained}): task must be one of {', '.join(PAIRED_METRICS)}, got {task!r}; "
                "pass the result of chestssl.eval.paired.paired_difference"
            )
        init = run_params[pretrained].get("init", "")
        for metric in PAIRED_METRICS[task]:
            entry = result.get(metric)
            if not isinstance(entry, Mapping) or not set(_RESULT_KEYS) <= set(entry):
                raise ValueError(
                    f"pair ({scratch}, {pretrained}): metric {metric!r} missing or not of the form "
                    f"{{{', '.join(_RESULT_KEYS)}}}; recompute it with chestssl.eval.paired.paired_difference"
                )
            column = _COLUMNS[metric]
            difference = _number(entry["difference"], column.digits, signed=True)
            if entry["difference"] is not None and entry["ci_low"] is not None and entry["ci_high"] is not None:
                low = _number(entry["ci_low"], column.digits, signed=True)
                high = _number(entry["ci_high"], column.digits, signed=True)
                difference += f" [{low}, {high}]"
            differences = seed_differences(seed_spreads.get(scratch), seed_spreads.get(pretrained), metric)
            verdict = _seed_verdict(entry["verdict"], differences)
            note = entry.get("note")
            if note:
                if note not in footnotes:
                    footnotes.append(note)
                difference += f"[^{prefix}-{footnotes.index(note) + 1}]"
                if entry["ci_low"] is None:
                    cell_notes.append(f"`{scratch}` vs `{pretrained}`, {column.header}: {note}")
            number_rows.append(
                {
                    "scratch_run": scratch,
                    "pretrained_run": pretrained,
                    "pretrained_init": init,
                    "task": task,
                    "metric": metric,
                    "scratch": entry["a"],
                    "pretrained": entry["b"],
                    "difference": entry["difference"],
                    "difference_ci_low": entry["ci_low"],
                    "difference_ci_high": entry["ci_high"],
                    "verdict": verdict_text(verdict, metric, entry["a"], entry["b"]),
                    **_seed_columns(differences),
                    "n_items": result.get("n_items"),
                    "n_patients": result.get("n_patients"),
                    "notes": note or "",
                }
            )
            text_rows.append(
                {
                    "Scratch run": scratch,
                    "Pretrained run": f"{pretrained} (init `{init}`)",
                    "Metric": column.header,
                    "Scratch": _number(entry["a"], column.digits),
                    "Pretrained": _number(entry["b"], column.digits),
                    f"{DIFFERENCE_HEADER}[^{prefix}-1]": difference,
                    **({"Over seeds": _seed_cell(differences, column.digits)} if seed_spreads else {}),
                    "Verdict": verdict_text(verdict, metric, entry["a"], entry["b"]),
                }
            )
    return Table(TABLE_NAME, TABLE_TITLE, pd.DataFrame(number_rows), pd.DataFrame(text_rows), footnotes, cell_notes)


def _seed_columns(differences: list[float] | None) -> dict[str, Any]:
    if differences is None:
        return {}
    values = np.array(differences, dtype=np.float64)
    return {"seed_difference_mean": float(values.mean()) if values.size else None,
            "seed_difference_sd": float(values.std(ddof=1)) if values.size > 1 else None,
            "training_seeds": int(values.size)}


def _seed_cell(differences: list[float] | None, digits: int) -> str:
    """``+0.021 ± 0.015 (3 seeds)``: the mean and sd of the per-seed differences."""
    columns = _seed_columns(differences)
    if not columns or columns["seed_difference_mean"] is None:
        return "n/a (one seed)" if differences is None else "n/a"
    text = _number(columns["seed_difference_mean"], digits, signed=True)
    if columns["seed_difference_sd"] is not None:
        text += f" ± {_number(columns['seed_difference_sd'], digits)}"
    return f"{text} ({columns['training_seeds']} seeds)"
