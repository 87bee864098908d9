"""Run a training stage in one process, or under ``torchrun`` when the params ask for more.

    python -m chestssl.launch stages/finetune.py seg_unetpp_scratch

reads the ``launch`` group of params.yaml. One process in all (``nproc_per_node`` x
``nnodes`` = 1) runs the script here, as ``python stages/finetune.py ...`` would. More
replace this process by ``python -m torch.distributed.run`` (torchrun) with those
settings: ``--standalone`` on one node (a free local port), the ``c10d`` rendezvous at
``rdzv_endpoint`` across nodes (each node runs the same ``dvc repro`` with the same
params). DVC records the stage like any other run, so ``dvc exp run -S
launch.nproc_per_node=8`` trains on 8 GPUs (gloo processes on a CPU) and ``launch`` is a
params dependency of every training stage: a different process count changes the data
each step sees, hence the result.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from chestssl.params import Launch, ParamsError, process_count, read_raw_params
from chestssl.schema import problems_of


def launch_settings(params_path: str | os.PathLike = "params.yaml") -> dict:
    """The validated ``launch`` group of the params files (every problem named with its key)."""
    from pydantic import ValidationError

    raw, _ = read_raw_params(params_path)
    try:
        return Launch.model_validate(raw.get("launch")).model_dump()
    except ValidationError as error:
        raise ParamsError(problems_of(error, Launch, ("launch",)), str(params_path)) from None


def torchrun_command(settings: dict, script: str, args: list[str]) -> list[str]:
    """The ``python -m torch.distributed.run ...`` command line that starts ``script``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(settings["nproc_per_node"])]
    if settings["nnodes"] == 1:
        command.append("--standalone")
    else:
        command += ["--nnodes", str(settings["nnodes"]), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", settings["rdzv_endpoint"], "--rdzv-id", settings["rdzv_id"]]
    return [*command, script, *args]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: python -m chestssl.launch stages/<stage>.py [argument]")
    script, args = argv[0], argv[1:]
    try:
        settings = launch_settings()
    except (ParamsError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    if process_count(settings) == 1:
        sys.argv = [script, *args]
        sys.path.insert(0, str(Path(script).resolve().parent))
        runpy.run_path(script, run_name="__main__")
        return
    command = torchrun_command(settings, script, args)
    print("launch: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
