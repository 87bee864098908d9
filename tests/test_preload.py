"""chestssl.preload: stages run by a server that has imported torch and MONAI, exactly as a
fresh interpreter would run them (arguments, folder, environment, streams, exit status,
signals, the project's code as it is now), and the same bytes out."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Starts stage processes that import torch and MONAI: scheduled early (tests/conftest.py).
pytestmark = pytest.mark.starts_stages

REPO_ROOT = Path(__file__).resolve().parents[1]

STAGE = textwrap.dedent('''
    import os, sys, time
    from chestssl.cli import run_stage

    def main(argv):
        import chestssl
        print("preloaded", os.environ.get("CHESTSSL_PRELOADED"), "torch", "torch" in sys.modules, flush=True)
        print("args", argv, "cwd", os.getcwd(), "marker", os.environ.get("STAGE_MARKER"), flush=True)
        print("chestssl", chestssl.__version__, os.path.dirname(chestssl.__file__), flush=True)
        print("stdin", sys.stdin.readline().strip(), flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        if argv[:1] == ["exit"]:
            raise SystemExit(int(argv[1]))
        if argv[:1] == ["missing"]:
            raise FileNotFoundError("data/processed not found; run the preprocess stage")
        if argv[:1] == ["sleep"]:
            open(argv[1], "w").write(str(os.getpid()))
            time.sleep(60)

    run_stage(main, preload="cold" not in sys.argv)
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server started as `python -m chestssl.preload run` starts it; yields (socket, env)."""
    folder = tmp_path_factory.mktemp("preload")
    path = str(folder / "socket")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "chestssl.preload", "serve", path, "--parent",
                                str(os.getpid())], env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield path, {**env, "CHESTSSL_PRELOAD": path}
    process.terminate()
    process.wait(timeout=30)
    assert not os.path.exists(path), "the server leaves its socket behind"


def _stage(tmp_path: Path) -> Path:
    script = tmp_path / "stages" / "stage.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(STAGE)
    return script


def _run(script: Path, env: dict, *args: str, stdin: str = "line\n", **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "stages/stage.py", *args], cwd=script.parents[1], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_the_server_runs_the_stage_with_its_arguments_folder_environment_and_streams(server, tmp_path):
    _, env = server
    script = _stage(tmp_path)
    done = _run(script, {**env, "STAGE_MARKER": "m1"}, "a", "b", stdin="hello\n")
    assert done.returncode == 0, done.stderr
    assert "preloaded 1 torch True" in done.stdout  # forked from the server, torch already imported
    assert f"args ['a', 'b'] cwd {tmp_path} marker m1" in done.stdout
    assert "stdin hello" in done.stdout and "to stderr" in done.stderr


def test_exit_status_and_user_errors_come_back_as_from_python(server, tmp_path):
    _, env = server
    script = _stage(tmp_path)
    assert _run(script, env, "exit", "3").returncode == 3
    missing = _run(script, env, "missing")
    assert missing.returncode == 1
    assert "error: data/processed not found; run the preprocess stage" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_the_stage_imports_the_project_code_from_where_a_fresh_interpreter_would(server, tmp_path):
    """The server imported its own chestssl; a stage run with another copy on PYTHONPATH gets that copy."""
    _, env = server
    copy = tmp_path / "copy"
    shutil.copytree(REPO_ROOT / "chestssl", copy / "chestssl", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "chestssl" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "edited"'))
    script = _stage(tmp_path)
    done = _run(script, {**env, "PYTHONPATH": str(copy)})
    assert done.returncode == 0, done.stderr
    assert "preloaded 1" in done.stdout and f"chestssl edited {copy / 'chestssl'}" in done.stdout


def test_a_different_import_environment_runs_the_stage_in_its_own_interpreter(server, tmp_path):
    _, env = server
    script = _stage(tmp_path)
    threads = "3" if env.get("OMP_NUM_THREADS") != "3" else "2"
    done = _run(script, {**env, "OMP_NUM_THREADS": threads})
    assert done.returncode == 0, done.stderr
    assert "preloaded None torch False" in done.stdout
    assert "not run by the server (environment variables read at import differ: OMP_NUM_THREADS)" in done.stderr


def test_other_interpreter_flags_run_the_stage_in_its_own_interpreter(server, tmp_path):
    _, env = server
    script = _stage(tmp_path)
    done = subprocess.run([sys.executable, "-O", "stages/stage.py"], cwd=tmp_path, env=env, input="x\n",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "preloaded None" in done.stdout and "interpreter flags (-O, -X, -W ...) differ" in done.stderr


def test_without_a_server_nothing_changes(tmp_path):
    script = _stage(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("CHESTSSL_PRELOAD", None)
    done = _run(script, env, "exit", "4")
    assert done.returncode == 4 and "preloaded None torch False" in done.stdout and "preload" not in done.stderr
    gone = _run(script, {**env, "CHESTSSL_PRELOAD": str(tmp_path / "no-socket")})
    assert gone.returncode == 0 and "preloaded None" in gone.stdout
    assert "did not answer" in gone.stderr


def _started(script: Path, env: dict, pid_file: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "stages/stage.py", "sleep", str(pid_file)], cwd=script.parents[1],
                               env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_signals_reach_the_stage_and_a_killed_stage_process_takes_its_stage_along(server, tmp_path):
    _, env = server
    script = _stage(tmp_path)
    interrupted = _started(script, env, tmp_path / "one.pid")
    stage = int((tmp_path / "one.pid").read_text())
    assert stage != interrupted.pid  # the stage runs in the server's fork
    interrupted.send_signal(signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=30)
    assert interrupted.returncode == 130 and "KeyboardInterrupt" in stderr.decode()

    terminated = _started(script, env, tmp_path / "two.pid")
    terminated.terminate()
    terminated.wait(timeout=30)
    assert terminated.returncode == -signal.SIGTERM  # died of the signal, as python would

    killed = _started(script, env, tmp_path / "three.pid")
    stage = int((tmp_path / "three.pid").read_text())
    killed.kill()
    killed.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(stage):
        assert time.monotonic() < deadline, "the stage outlived its stage process"
        time.sleep(0.1)


TRAIN = textwrap.dedent('''
    import hashlib, sys
    from chestssl.cli import run_stage

    def main(argv):
        import torch
        from monai.networks.nets import BasicUNet
        torch.manual_seed(0)
        net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
        optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
        images = torch.rand(4, 1, 32, 32)
        for _ in range(3):
            optimiser.zero_grad()
            net(images).square().mean().backward()
            optimiser.step()
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()
        print("weights", digest, torch.get_num_threads())

    run_stage(main)
''')


def test_a_training_gives_the_same_bytes_in_the_server_as_in_its_own_interpreter(server, tmp_path):
    _, env = server
    script = tmp_path / "stages" / "stage.py"
    script.parent.mkdir(parents=True)
    script.write_text(TRAIN)
    cold_env = {key: value for key, value in env.items() if key != "CHESTSSL_PRELOAD"}
    cold, warm = _run(script, cold_env), _run(script, env)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    assert "preload" not in warm.stderr
    assert cold.stdout.split() == warm.stdout.split() and cold.stdout.startswith("weights ")


def test_run_wraps_a_command_and_returns_its_status(tmp_path):
    script = _stage(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = (f'echo "socket $CHESTSSL_PRELOAD"; {sys.executable} stages/stage.py exit 0 </dev/null && '
               f'{sys.executable} stages/stage.py exit 5 </dev/null')
    done = subprocess.run([sys.executable, "-m", "chestssl.preload", "run", "--", "bash", "-c", command],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr
    assert done.stdout.count("preloaded 1") == 2
    socket = Path(done.stdout.split("socket ", 1)[1].split()[0])
    assert not socket.exists() and not socket.parent.exists(), "run leaves the server's socket behind"


def test_run_names_a_command_it_cannot_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "chestssl.preload", "run", "--", "no-such-command-xyz"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 127
    assert "error: cannot run 'no-such-command-xyz'" in done.stderr


def test_a_stage_that_asks_to_run_cold_is_not_sent_to_the_server(server, tmp_path):
    _, env = server
    script = _stage(tmp_path)
    done = _run(script, env, "cold")
    assert done.returncode == 0 and "preloaded None torch False" in done.stdout and "preload" not in done.stderr
