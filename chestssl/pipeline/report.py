"""Stage ``report``: tables and figures of every method and run, and ``reports/README.md``.

:func:`chestssl.report.pipeline.build_pipeline_report` reads the outputs of the stages
the params name (metrics, examples, per-slice scores and curves under ``reports/``, the
radiographs folder) and writes the tables (Markdown + CSV), the figures and the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths


def report(params: Mapping[str, Any], out_dir: str | Path = paths.REPORTS_DIR) -> list[Path]:
    """Write the report of everything the params name into ``out_dir``; returns the files written.

    The other stages' outputs are read where :mod:`chestssl.paths` puts them, relative to
    the working folder (the repository root under ``dvc repro``).

    Args:
        params: the loaded params (the entries and lists whose results are reported,
            ``evaluate``, ``report``, ``data.source``).
        out_dir: ``reports``: receives ``README.md``, ``tables/`` and ``figures/``.
    """
    from chestssl.report.pipeline import build_pipeline_report

    return build_pipeline_report(params, Path(out_dir))
