"""Start-up time of every stage script: from process start to its first touch of the stage's data.

Each script in ``stages/`` runs in a fresh Python process, as ``dvc repro`` runs it (the
stage's command-line argument, ``python stages/<stage>.py``), in an empty temporary
working folder that holds only the params files. An audit hook (:func:`sys.addaudithook`)
ends the process, before the operation happens, at the stage's first touch of
``data/``, ``models/``, ``reports/`` or ``checkpoints/`` (opening, listing, creating or
removing a file or folder there): the first line of real work, whether reading an input
or writing an output. What is timed is therefore everything a stage does before it works:
interpreter start, imports, loading and validating the params, building its model. With no
inputs there, most stages stop on their first input check instead (``... not found; run the
... stage``), at the same point. A module a stage's work imports only after its first touch
(:data:`LATER`) is imported and timed in the same process after the stop, so that moving an
import past the first touch does not count as a saving.

Each stage is timed ``--repeats`` times, baseline and ours interleaved, and the median
counts. The baseline is another checkout of the repository (``--base``, e.g. the previous
commit in a ``git worktree``), run from its own ``chestssl`` (``PYTHONPATH``) with its own
stage scripts and params files. Both share one bytecode cache (``PYTHONPYCACHEPREFIX``) that
an untimed first run warms, so neither pays for compiling. One more untimed run with
``python -X importtime`` attributes the import time (self time, summed per top-level
package) to name the heaviest imports.

    python benchmarks/stage_startup.py --base /tmp/base_wt
    python benchmarks/stage_startup.py --stages report finetune --repeats 5

Results are printed and written atomically to ``reports/benchmarks/stage_startup.md``
(and ``stage_startup.json`` beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Every stage script, and the params list its argument comes from (``None``: no argument).
#: The preferred entry is used where the list has it, else the list's first.
STAGES: dict[str, tuple[str, str] | None] = {
    "download": None,
    "preprocess": None,
    "radiographs": None,
    "pretrain": ("methods", "ae_cnn_attention"),
    "evaluate_pretrain": ("methods", "ae_cnn_attention"),
    "finetune": ("runs", "seg_unetpp_cnn_attention"),
    "evaluate": ("runs", "seg_unetpp_cnn_attention"),
    "pretrain_radiographs": ("pretrain_radiographs.methods", ""),
    "pretrain_radiograph_studies": ("pretrain_radiographs.study_methods", ""),
    "align_radiographs": None,
    "pretrain_cross_modal": ("cross_modal.methods", ""),
    "label_fraction": ("label_fraction.runs", ""),
    "frozen_parts": ("frozen_parts.runs", ""),
    "latent_diffusion": ("latent_diffusion", "ae_cnn_attention"),
    "evaluate_latent_diffusion": ("latent_diffusion", "ae_cnn_attention"),
    "report": None,
}

#: Modules whose presence after start-up the table reports.
HEAVY = ("torch", "monai", "scipy.stats", "pandas", "matplotlib", "seaborn", "sklearn")

#: Modules a stage's work imports after its first touch of data, imported (and timed) in the
#: same process after the stop, so that an import moved past the first touch is still
#: counted: rendering a radiograph resamples with torch and windows and pads with MONAI
#: transforms; the report's paired table and its figures' per-image scores (SSIM, Dice)
#: come from chestssl.eval.metrics (torch, MONAI, scikit-learn); ``label_fraction`` checks its
#: inputs before it imports the training code (its models, hence torch and MONAI). Both trees
#: get the same list; where a module is loaded already, it costs nothing.
LATER: dict[str, tuple[str, ...]] = {
    "radiographs": ("torch", "monai.transforms"),
    "label_fraction": ("torch", "monai"),
    "report": ("chestssl.eval.metrics",),
}

#: The child process: installs the audit hook, then runs the stage script as ``__main__``.
#: At the stop it imports the stage's :data:`LATER` modules, reports one JSON line on fd 1
#: and leaves with ``os._exit`` (no interpreter teardown).
RUNNER = r"""
import importlib, json, os, runpy, sys, time
root = os.getcwd()
watched = tuple(os.path.join(root, d) for d in ("data", "models", "reports", "checkpoints"))
events = {"open", "os.mkdir", "os.listdir", "os.scandir", "os.remove", "os.rmdir", "os.rename",
          "os.replace", "shutil.rmtree", "os.chmod", "os.truncate", "os.utime"}
heavy = %(heavy)r
later = [m for m in os.environ.get("STARTUP_LATER", "").split(",") if m]
stopped = []

def report(stop, where):
    if stopped:
        return
    stopped.append(stop)
    loaded = [m for m in heavy if m in sys.modules]
    start = time.perf_counter()
    for module in later:
        importlib.import_module(module)
    line = json.dumps({"stop": stop, "where": where, "loaded": loaded, "later_s": time.perf_counter() - start})
    os.write(1, ("\nSTARTUP " + line + "\n").encode())
    os._exit(0)

def hook(event, args):
    if not stopped and event in events and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if any(path == w or path.startswith(w + os.sep) for w in watched):
            report("work", event + " " + os.path.relpath(path, root))

sys.addaudithook(hook)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    report("exit", "exit status %%s" %% (exc.code,))
except BaseException as exc:
    report("error", "%%s: %%s" %% (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
report("finished", "")
""" % {"heavy": HEAVY}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("/tmp/base_wt"),
                        help="checkout of the baseline code (default /tmp/base_wt); 'none' to skip it")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage and code; the median counts")
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=list(STAGES),
                        help="stages to time (default all)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "stage_startup.md")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if str(args.base).lower() == "none":
        args.base = None
    elif not (args.base / "stages").is_dir():
        parser.error(f"--base {args.base}: no stages/ folder there")
    return args


def _raw_params(tree: Path) -> dict[str, Any]:
    """``params.yaml`` and the files of ``params/`` merged (top-level keys), read as plain YAML."""
    import yaml

    merged: dict[str, Any] = {}
    for path in [tree / "params.yaml", *sorted((tree / "params").glob("*.yaml"))]:
        if path.parent.name == "params" and path.stem not in ("presets", "methods", "runs"):
            continue  # profiles (lidc-full.yaml, cxr-*.yaml) are overrides, not the default
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    value: Any = params
    for key in dotted.split("."):
        value = value[key]
    return value


def stage_argv(stage: str, params: dict[str, Any]) -> list[str]:
    spec = STAGES[stage]
    if spec is None:
        return []
    names = list(_lookup(params, spec[0]))
    if not names:
        raise SystemExit(f"{stage}: {spec[0]} lists no entry to time")
    return [spec[1] if spec[1] in names else names[0]]


class Tree:
    """One checkout of the code: its stage scripts and a working folder with its params files."""

    def __init__(self, label: str, root: Path, work: Path):
        self.label, self.root = label, root
        self.work = work / label
        self.work.mkdir(parents=True)
        shutil.copy2(root / "params.yaml", self.work / "params.yaml")
        if (root / "params").is_dir():
            shutil.copytree(root / "params", self.work / "params")
        self.params = _raw_params(root)

    def env(self, stage: str, cache: Path) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.root), "PYTHONPYCACHEPREFIX": str(cache),
                "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg", "STARTUP_LATER": ",".join(LATER.get(stage, ()))}

    def run(self, stage: str, cache: Path, importtime: bool = False) -> dict[str, Any]:
        """One fresh process of ``stage`` up to its first touch of data (and its :data:`LATER` imports):
        seconds, the seconds of the later imports, where it stopped and what was loaded there."""
        cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", RUNNER,
               str(self.root / "stages" / f"{stage}.py"), *stage_argv(stage, self.params)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.work, env=self.env(stage, cache), capture_output=True, text=True)
        seconds = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("STARTUP ")]
        if not lines:
            raise RuntimeError(f"{self.label} {stage}: no start-up report (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        result = {"seconds": seconds, **json.loads(lines[-1][len("STARTUP "):])}
        if result["stop"] == "exit":
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            result["where"] += f" ({errors[-1]})" if errors else ""
        if importtime:
            result["imports"] = heaviest_imports(proc.stderr)
        return result


def heaviest_imports(stderr: str, top: int = 4) -> list[tuple[str, float]]:
    """``-X importtime`` output -> the top-level packages with the most import time (self times summed), s."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        package = name.strip().split(".")[0]
        totals[package] = totals.get(package, 0.0) + int(self_us) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def stage_instances(params: dict[str, Any]) -> dict[str, int]:
    """How many DVC stages of the default profile run each script (``foreach`` expansions)."""
    return {
        "download": 1, "preprocess": 1, "radiographs": 1, "report": 1, "align_radiographs": 1,
        "pretrain": len(params["methods"]) + len(params.get("multihead") or {}),
        "evaluate_pretrain": len(params["methods"]) + len(params.get("multihead") or {}),
        "finetune": len(params["runs"]), "evaluate": len(params["runs"]),
        "pretrain_radiographs": len(params["pretrain_radiographs"]["methods"]),
        "pretrain_radiograph_studies": len(params["pretrain_radiographs"]["study_methods"]),
        "pretrain_cross_modal": len(params["cross_modal"]["methods"]),
        "label_fraction": len(params["label_fraction"]["runs"]),
        "frozen_parts": len(params["frozen_parts"]["runs"]),
        "latent_diffusion": len(params.get("latent_diffusion") or {}),
        "evaluate_latent_diffusion": len(params.get("latent_diffusion") or {}),
    }


def _fmt_imports(imports: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in imports)


def markdown(report: dict[str, Any]) -> str:
    has_base = report["baseline"] is not None
    lines = [
        "# Stage start-up",
        "",
        "Written by `python benchmarks/stage_startup.py` (its docstring gives the method): seconds from",
        "process start to each stage script's first touch of `data/`, `models/`, `reports/` or",
        "`checkpoints/`, run as `dvc repro` runs it; the median of "
        f"{report['setup']['repeats']} fresh processes per stage{', baseline and ours interleaved' if has_base else ''}.",
        f"Machine: {report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
        f"load average {report['machine']['load_average_1min']:.2f} at the start.",
        "",
    ]
    if has_base:
        lines += [f"Baseline: `{report['baseline']}`.", ""]
        header = ("| stage | argument | before (s) | after (s) | after / before | after, to first touch (s) "
                  "| heaviest imports after (s) | loaded at first touch, after |")
        rule = "|---|---|---:|---:|---:|---:|---|---|"
    else:
        header = "| stage | argument | seconds | to first touch (s) | heaviest imports (s) | loaded at first touch |"
        rule = "|---|---|---:|---:|---|---|"
    lines += [header, rule]
    for stage, row in report["stages"].items():
        ours = row["ours"]
        cells = [f"`{stage}`", " ".join(row["argv"]) or "-"]
        if has_base:
            base = row["baseline"]
            cells += [f"{base['median_s']:.2f}", f"{ours['median_s']:.2f}", f"{ours['median_s'] / base['median_s']:.2f}"]
        else:
            cells.append(f"{ours['median_s']:.2f}")
        cells.append(f"{ours['first_touch_median_s']:.2f}")
        cells += [_fmt_imports(ours["imports"]), ", ".join(ours["loaded"]) or "none of them"]
        lines.append("| " + " | ".join(cells) + " |")
    totals = report["default_profile"]
    spread = statistics.median((max(runs) - min(runs)) / statistics.median(runs)
                               for row in report["stages"].values() for label in ("baseline", "ours") if label in row
                               for runs in [row[label]["seconds"]])
    lines += ["", f"The runs of one stage spread by {spread:.0%} of their median (the median spread over stages) on "
              "this shared machine; ratios that close to 1 are noise."]
    lines += ["", f"Over the default profile's {totals['stages']} stages (each script times its number of "
              f"`foreach` expansions): {totals['ours_s']:.0f} s of start-up"
              + (f", against {totals['baseline_s']:.0f} s before ({totals['ours_s'] / totals['baseline_s']:.2f})."
                 if has_base else "."), ""]
    lines += ["Where each stage stopped (ours):", ""]
    lines += [f"- `{stage}`: {row['ours']['stop']}, {row['ours']['where']}" for stage, row in report["stages"].items()]
    lines += ["", "The seconds count the imports each stage's work makes after its first touch, timed in the same",
              "process after the stop (`LATER` in the script: "
              + "; ".join(f"`{stage}`: {', '.join(modules)}" for stage, modules in LATER.items())
              + "); *to first touch* leaves them out. `loaded` lists which of "
              + ", ".join(f"`{m}`" for m in HEAVY) + " were imported at the first touch.",
              "Every MONAI import runs `monai/__init__.py`, which imports all of MONAI's subpackages (and with",
              "them scipy.stats, pandas, scikit-learn and matplotlib.pyplot), so a stage that uses one MONAI",
              "class pays for all of it.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    from chestssl.io import write_json, write_text

    with tempfile.TemporaryDirectory(prefix="chestssl-startup-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "pycache"
        trees = [Tree("ours", REPO, tmp)]
        if args.base is not None:
            trees.insert(0, Tree("baseline", args.base.resolve(), tmp))
        results: dict[str, dict[str, Any]] = {}
        for stage in args.stages:
            row: dict[str, Any] = {"argv": stage_argv(stage, trees[-1].params)}
            for tree in trees:
                tree.run(stage, cache)  # warms the bytecode cache, untimed
            runs: dict[str, list[dict[str, Any]]] = {tree.label: [] for tree in trees}
            for _ in range(args.repeats):
                for tree in trees:
                    runs[tree.label].append(tree.run(stage, cache))
            for tree in trees:
                profile = tree.run(stage, cache, importtime=True)
                last = runs[tree.label][-1]
                row[tree.label] = {
                    "seconds": [round(r["seconds"], 3) for r in runs[tree.label]],
                    "median_s": round(statistics.median(r["seconds"] for r in runs[tree.label]), 3),
                    "first_touch_median_s": round(statistics.median(
                        r["seconds"] - r["later_s"] for r in runs[tree.label]), 3),
                    "later_median_s": round(statistics.median(r["later_s"] for r in runs[tree.label]), 3),
                    "stop": last["stop"], "where": last["where"], "loaded": last["loaded"],
                    "imports": [(name, round(s, 2)) for name, s in profile["imports"]],
                }
            results[stage] = row
            line = f"{stage:28s} " + "  ".join(f"{t.label} {row[t.label]['median_s']:6.2f} s" for t in trees)
            print(line + f"  ({row['ours']['stop']}: {row['ours']['where']})", flush=True)

    counts = stage_instances(trees[-1].params)
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")},
        "setup": {"repeats": args.repeats},
        "baseline": str(args.base) if args.base is not None else None,
        "stages": results,
        "default_profile": {
            "stages": sum(counts[s] for s in results),
            "ours_s": sum(counts[s] * results[s]["ours"]["median_s"] for s in results),
            **({"baseline_s": sum(counts[s] * results[s]["baseline"]["median_s"] for s in results)}
               if args.base is not None else {}),
        },
    }
    text = markdown(report)
    print("\n" + text)
    write_text(args.out, text)
    write_json(args.out.with_suffix(".json"), report)
    return report


if __name__ == "__main__":
    main()
