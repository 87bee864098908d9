"""The launcher of training stages: one process here, or torchrun as params.yaml says."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from chestssl import launch
from chestssl.params import PARAMS_FILES, ParamsError, read_raw_params, write_raw_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A folder with the shipped params files, as the working directory."""
    for name in ["params.yaml", *PARAMS_FILES]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_launch(project: Path, **settings) -> None:
    raw = read_raw_params(project / "params.yaml")[0]
    raw["launch"].update(settings)
    write_raw_params(raw, project / "params.yaml")


def test_one_process_runs_the_script_here_with_its_argument(project):
    script = project / "stage.py"
    script.write_text("import sys, os\nopen('ran.txt', 'w').write(' '.join(sys.argv) + ' ' + str(os.getpid()))\n")
    launch.main([str(script), "an_entry"])
    argv_and_pid = (project / "ran.txt").read_text().split()
    assert argv_and_pid[:2] == [str(script), "an_entry"] and int(argv_and_pid[2]) == __import__("os").getpid()


def test_more_processes_replace_this_one_by_torchrun(project, monkeypatch, capsys):
    set_launch(project, nproc_per_node=2)
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda path, args: calls.append((path, args)))
    launch.main(["stages/finetune.py", "seg_unetpp_scratch"])
    ((path, args),) = calls
    assert path == sys.executable and args[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                                   "--standalone", "stages/finetune.py", "seg_unetpp_scratch"]
    assert "launch: -m torch.distributed.run --nproc-per-node 2 --standalone" in capsys.readouterr().err


def test_several_nodes_meet_at_the_rendezvous():
    settings = {"nproc_per_node": 4, "nnodes": 2, "rdzv_endpoint": "node0:29400", "rdzv_id": "job7"}
    assert launch.torchrun_command(settings, "stages/pretrain.py", ["mae"])[3:] == [
        "--nproc-per-node", "4", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400",
        "--rdzv-id", "job7", "stages/pretrain.py", "mae"]


def test_bad_settings_name_their_key(project):
    set_launch(project, nnodes=2, nproc_per_node=0)
    with pytest.raises(ParamsError) as error:
        launch.launch_settings()
    assert error.value.problems == ["launch.nproc_per_node: got 0, expected an integer >= 1 (processes (GPUs) per "
                                    "node; more than 1 in all starts torchrun)"]
    set_launch(project, nproc_per_node=1)
    with pytest.raises(ParamsError, match=r"launch\.rdzv_endpoint: nnodes is 2, but rdzv_endpoint is empty"):
        launch.launch_settings()
    with pytest.raises(SystemExit, match="launch.rdzv_endpoint"):
        launch.main(["stages/finetune.py", "x"])
