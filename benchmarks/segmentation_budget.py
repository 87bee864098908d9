"""What the quick profile's 2D segmentation gains from larger slices or longer training.

On a reproduced checkout (``data/processed`` and the run's pretrained encoder in
``models/pretrain/``), one 2D segmentation run of ``runs`` (default
``seg_swinunetr_scratch``) is fine-tuned and evaluated on the test split, as
``finetune@<run>`` and ``evaluate@<run>`` do, for each slice size (``slices.side``; the ViT
preset's ``img_size`` follows it, as the params check requires) and each number of epochs
of its recipe (``recipes.<recipe>.epochs``; every other setting as in the params files, or
as ``--set KEY=VALUE`` gives it, for every combination: ``KEY`` dotted, ``VALUE`` YAML).
Each combination runs in a temporary working folder holding copies of the params files
with those two values changed and links to ``data/processed`` and ``models/pretrain``, so
the checkout's outputs are untouched. Reported per combination: the fine-tuning and
evaluation wall times, the median nodule's size in pixels at that slice size
(:func:`chestssl.report.anatomy_figures.nodule_scale`), the global Dice on the training
split's nodule slices (what the model fitted), the best validation Dice and the test split's
global Dice with its patient-bootstrap interval.

    python benchmarks/segmentation_budget.py --sizes 64 96 --epochs 10 50
    python benchmarks/segmentation_budget.py --sizes 64 --epochs 10 --set runs.seg_swinunetr_scratch.loss=dice \
        --out reports/benchmarks/segmentation_dice_loss.md

Results are printed and written atomically to ``reports/benchmarks/segmentation_budget.md``
(and ``.json`` beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # process_tree.py, beside this script
    sys.path.insert(0, HERE)

from process_tree import write_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _work_folder(root: Path, checkout: Path, size: int, recipe: str, epochs: int, settings: list[str]) -> Path:
    from chestssl.params import ParamsError, read_raw_params, write_raw_params
    from chestssl.profiles import apply_settings

    work = root / f"size{size}_epochs{epochs}"
    write_raw_params(read_raw_params(checkout / "params.yaml")[0], work / "params.yaml")
    try:
        apply_settings(work / "params.yaml", settings)  # as `python -m chestssl.profiles ... --set`
    except ParamsError as error:
        raise SystemExit(f"--set: {error}") from None
    raw, _ = read_raw_params(work / "params.yaml")
    raw["slices"]["side"] = size
    if "vit" in raw.get("backbones", {}):
        raw["backbones"]["vit"]["img_size"] = size
    raw["recipes"][recipe]["epochs"] = epochs
    write_raw_params(raw, work / "params.yaml")
    (work / "data").mkdir()
    (work / "data" / "processed").symlink_to(checkout / "data" / "processed")
    (work / "models").mkdir()
    (work / "models" / "pretrain").symlink_to(checkout / "models" / "pretrain")
    return work


def _training_dice(work: Path, run_name: str) -> tuple[float, int, int]:
    """Global Dice of the fine-tuned model in ``work`` on the training split's nodule slices,
    the ones it learned from, scored as ``evaluate`` scores the test split
    (:func:`chestssl.eval.downstream.score_predictions`), with the number of those slices and
    of their patients."""
    import torch

    from chestssl.data.datasets import SliceDataset, slice_options
    from chestssl.eval.downstream import score_predictions
    from chestssl.inference import predict_dataset
    from chestssl.params import load_params
    from chestssl.pipeline.evaluate import load_run_model

    params = load_params(work / "params.yaml")
    cpu = torch.device("cpu")
    model = load_run_model(params["runs"][run_name], run_name, work / "models" / "finetune" / run_name / "model.pt",
                           params["seed"], cpu)
    train = SliceDataset(work / "data" / "processed", "train", task="seg", **slice_options(params["slices"]))
    with torch.no_grad():
        out = predict_dataset(model.predict, train, device=cpu)
    scored = score_predictions("seg", out, params["evaluate"], seed=params["seed"])
    return scored["dice_global"]["value"], scored["n_images"], scored["n_patients"]


def _stage(work: Path, script: str, run: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "stages" / script), run], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} {run} in {work} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="a reproduced checkout (default: this one)")
    parser.add_argument("--run", default="seg_swinunetr_scratch", help="a 2D segmentation entry of `runs`")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params setting for every combination (repeatable), e.g. runs.<run>.loss=dice")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "segmentation_budget.md")
    args = parser.parse_args(argv)

    from chestssl.params import read_raw_params
    from chestssl.report.anatomy_figures import nodule_scale

    checkout = args.checkout.resolve()
    raw, _ = read_raw_params(checkout / "params.yaml")
    entry = (raw.get("runs") or {}).get(args.run)
    if entry is None or entry.get("task") != "seg":
        raise SystemExit(f"{args.run!r} is not a segmentation entry of `runs` in {checkout}")
    recipe = entry["recipe"]
    for needed in (checkout / "data" / "processed", checkout / "models" / "pretrain" / entry["init"]):
        if not needed.exists():
            raise SystemExit(f"{needed} not found; reproduce the checkout first (make reproduce)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", "DVC_NO_ANALYTICS": "1"}
    env.pop("CHESTSSL_PRELOAD", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="segmentation-budget-") as tmp:
        for size in args.sizes:
            scale = nodule_scale(checkout / "data" / "processed", size, raw["slices"]["field_of_view"],
                                 raw["slices"].get("pixel_mm"))
            for epochs in args.epochs:
                work = _work_folder(Path(tmp), checkout, size, recipe, epochs, args.set)
                finetune_s = _stage(work, "finetune.py", args.run, env)
                evaluate_s = _stage(work, "evaluate.py", args.run, env)
                training_dice, training_images, training_patients = _training_dice(work, args.run)
                trained = json.loads((work / "reports" / "finetune" / args.run / "metrics.json").read_text())
                tested = json.loads((work / "reports" / "evaluate" / args.run / "metrics.json").read_text())
                dice = tested["dice_global"]
                rows.append({"size": size, "epochs": epochs, "steps": trained.get("steps"),
                             "nodule_pixels": round(scale["nodule_pixels"], 2) if scale else None,
                             "finetune_s": round(finetune_s, 1), "evaluate_s": round(evaluate_s, 1),
                             "best_val_dice": round(trained["best_val_dice"], 4),
                             "training_dice_global": round(training_dice, 4),
                             "test_dice_global": round(dice["value"], 4),
                             "test_dice_interval": [round(dice["ci_low"], 4), round(dice["ci_high"], 4)],
                             "test_patients": tested.get("n_patients"), "test_images": tested.get("n_images"),
                             "training_patients": training_patients, "training_images": training_images})
                print(json.dumps(rows[-1]), flush=True)
    result = {"run": args.run, "recipe": recipe, "settings": args.set, "checkout": str(checkout),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average": os.getloadavg()[0]},
              "rows": rows}
    base = rows[0]
    lines = [
        "# 2D segmentation: slice size and training length",
        "",
        f"Written by `python benchmarks/segmentation_budget.py` (its docstring gives the method): `{args.run}` "
        f"(recipe `{recipe}`) fine-tuned and tested at each slice size and number of epochs, everything else as "
        f"in the params files{''.join(f', `{setting}`' for setting in args.set)}. "
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}. Test split: {base['test_patients']} patients, {base['test_images']} slices.",
        "",
        "| slice size | median nodule (px) | epochs | steps | fine-tuning (s) | vs first | evaluation (s) "
        "| training Dice (global) | best val Dice | test Dice (global) | 95% interval |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *(f"| {r['size']} | {r['nodule_pixels']} | {r['epochs']} | {r['steps']} | {r['finetune_s']:.1f} | "
          f"{r['finetune_s'] / base['finetune_s']:.2f}x | {r['evaluate_s']:.1f} | {r['training_dice_global']:.3f} | "
          f"{r['best_val_dice']:.3f} | {r['test_dice_global']:.3f} | "
          f"{r['test_dice_interval'][0]:.3f}-{r['test_dice_interval'][1]:.3f} |"
          for r in rows),
        "",
        f"Training Dice: the fine-tuned model on the {base['training_images']} nodule slices of the training split "
        f"({base['training_patients']} patients) it learned from. Fine-tuning times include each process's start "
        "(imports, about 4 s).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_atomic(args.out, text)
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
