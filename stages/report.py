"""report: tables and figures of every method and run, and reports/README.md."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.params import load_params


def main(argv: list[str]) -> None:
    from chestssl.report import build_report

    params = load_params()
    methods, runs = params["methods"], params["runs"]
    live_dirs = {f"pretrain@{m}": paths.pretrain_report_dir(m) / "live" for m in methods}
    live_dirs |= {f"finetune@{r}": paths.finetune_report_dir(r) / "live" for r in runs}
    examples = {f"pretrain@{m}": paths.evaluate_pretrain_dir(m) / "examples.npz" for m in methods}
    examples |= {f"evaluate@{r}": paths.evaluate_dir(r) / "examples.npz" for r in runs}
    build_report(
        paths.REPORTS_DIR,
        pretrain_metrics={m: paths.evaluate_pretrain_dir(m) / "metrics.json" for m in methods},
        eval_metrics={r: paths.evaluate_dir(r) / "metrics.json" for r in runs},
        run_params=runs,
        live_dirs=live_dirs,
        examples=examples,
        context={"data_source": params["data"]["source"], "split": params["preprocess"]["split"],
                 "methods": methods},
    )
    print(f"report: {paths.REPORTS_DIR / 'README.md'}")


if __name__ == "__main__":
    run_stage(main)
