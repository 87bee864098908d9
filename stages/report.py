"""report: tables and figures of every method and run, and reports/README.md."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params  # method entries in shape only: this stage imports no torch


def main(argv: list[str]) -> None:
    from chestssl.pipeline.report import report

    report(load_params(), paths.REPORTS_DIR)
    print(f"report: {paths.REPORTS_DIR / 'README.md'}")


if __name__ == "__main__":
    run_stage(main)
