"""report: tables and figures of every method and run, and reports/README.md."""

from __future__ import annotations

import json

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.report import build_report

    params = load_params()
    methods, runs = params["methods"], params["runs"]
    reconstructing = [m for m in methods
                      if json.loads((paths.evaluate_pretrain_dir(m) / "metrics.json").read_text())["reconstructs"]]
    seg_runs = [r for r in runs if runs[r]["task"] == "seg"]
    live_dirs = {f"pretrain@{m}": paths.pretrain_report_dir(m) / "live" for m in methods}
    live_dirs |= {f"finetune@{r}": paths.finetune_report_dir(r) / "live" for r in runs}
    examples = {m: paths.evaluate_pretrain_dir(m) / "examples.npz" for m in reconstructing}
    examples |= {r: paths.evaluate_dir(r) / "examples.npz" for r in seg_runs}
    build_report(
        paths.REPORTS_DIR,
        pretrain_metrics={m: paths.evaluate_pretrain_dir(m) / "metrics.json" for m in reconstructing},
        eval_metrics={r: paths.evaluate_dir(r) / "metrics.json" for r in runs},
        run_params=runs,
        live_dirs=live_dirs,
        examples=examples,
        params=params,
    )
    print(f"report: {paths.REPORTS_DIR / 'README.md'}")


if __name__ == "__main__":
    run_stage(main)
