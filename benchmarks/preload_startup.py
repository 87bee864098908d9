"""Start-up of stage processes in their own interpreter vs forked from the preload server.

Each stage script runs as ``dvc repro`` runs it (``python stages/<stage>.py <entry>``) in an
empty temporary working folder that holds only the params files, so it stops with an error
at its first input check (``... not found; run the ... stage``): what is timed is the wall
time from process start to that check, i.e. interpreter start, imports, params and model
set-up. Each stage runs ``--repeats`` times in its own interpreter ("cold") and as many
times with ``CHESTSSL_PRELOAD`` naming a server started once before (``chestssl.preload``;
its own start, which overlaps the first stages of a real run, is timed apart), the two
interleaved; the medians and their ratio are reported. A stage that checks its inputs
before importing torch (``label_fraction``) gains nothing here, and its real run does.

    python benchmarks/preload_startup.py
    python benchmarks/preload_startup.py --stages finetune evaluate --repeats 5

Results are printed and written atomically to ``reports/benchmarks/preload_startup.md``
(and ``.json`` beside it).
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

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # stage_startup.py and process_tree.py, beside this script
    sys.path.insert(0, HERE)

from process_tree import write_atomic  # noqa: E402
from stage_startup import STAGES, _raw_params, stage_argv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The stages that import torch: what the server can save.
DEFAULT_STAGES = ["pretrain", "evaluate_pretrain", "finetune", "evaluate", "pretrain_radiographs",
                  "pretrain_cross_modal", "align_radiographs", "label_fraction"]


def _once(stage: str, argv: list[str], work: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *argv], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return seconds, (lines[-1] if lines else f"exit status {done.returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=DEFAULT_STAGES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "preload_startup.md")
    args = parser.parse_args(argv)
    params = _raw_params(REPO)
    base_env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}
    base_env.pop("CHESTSSL_PRELOAD", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="preload-startup-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        shutil.copy2(REPO / "params.yaml", work / "params.yaml")
        shutil.copytree(REPO / "params", work / "params")
        socket_path = str(Path(tmp) / "socket")
        started = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "chestssl.preload", "serve", socket_path, "--parent",
                                   str(os.getpid())], env=base_env, start_new_session=True)
        try:
            warm_env = {**base_env, "CHESTSSL_PRELOAD": socket_path}
            while not os.path.exists(socket_path):
                time.sleep(0.01)
            # The first request waits until the server has imported everything: its start.
            _once(args.stages[0], stage_argv(args.stages[0], params), work, warm_env)
            server_start = time.perf_counter() - started
            for stage in args.stages:
                stage_args = stage_argv(stage, params)
                _once(stage, stage_args, work, base_env)  # untimed: warms the bytecode and page caches
                cold, warm, stops = [], [], set()
                for _ in range(args.repeats):
                    seconds, stop = _once(stage, stage_args, work, base_env)
                    cold.append(seconds)
                    stops.add(stop[:120])
                    seconds, stop = _once(stage, stage_args, work, warm_env)
                    warm.append(seconds)
                    stops.add(stop[:120])
                rows.append({"stage": stage, "argument": " ".join(stage_args), "cold_s": statistics.median(cold),
                             "preloaded_s": statistics.median(warm), "stops": sorted(stops)})
                print(f"{stage}: cold {rows[-1]['cold_s']:.2f} s, preloaded {rows[-1]['preloaded_s']:.2f} s",
                      flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    cold_total = sum(r["cold_s"] for r in rows)
    warm_total = sum(r["preloaded_s"] for r in rows)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "load_average": os.getloadavg()[0]},
              "repeats": args.repeats, "server_start_s": server_start, "stages": rows,
              "cold_total_s": cold_total, "preloaded_total_s": warm_total}
    lines = [
        "# Stage start-up: own interpreter vs forked from the preload server",
        "",
        f"Written by `python benchmarks/preload_startup.py` (its docstring gives the method). Machine: "
        f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, load average "
        f"{result['machine']['load_average']:.2f} at the end; medians of {args.repeats} runs each.",
        "",
        "| stage | cold (s) | preloaded (s) | ratio | where it stopped |",
        "|---|---:|---:|---:|---|",
        *(f"| `{(r['stage'] + ' ' + r['argument']).strip()}` | {r['cold_s']:.2f} | {r['preloaded_s']:.2f} | "
          f"{r['cold_s'] / r['preloaded_s']:.1f}x | {'; '.join(r['stops'])[:160]} |" for r in rows),
        "",
        f"Sum over these stages: {cold_total:.1f} s cold, {warm_total:.1f} s preloaded "
        f"({cold_total / warm_total:.1f}x). The server's own start (to its first stage): {server_start:.1f} s, "
        "once per `make reproduce`, while the first stages (download, preprocess) run.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_atomic(args.out, text)
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
