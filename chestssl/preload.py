"""Stage processes that do not import torch and MONAI again: a server that has imported them once.

``dvc repro`` starts one process per stage (about 100 in the quick profile), and each
training or evaluation stage spends about 4 s importing torch and MONAI (``import monai``
loads every MONAI subpackage) before it does anything. ::

    python -m chestssl.preload run -- dvc repro        # what `make reproduce` runs

starts a server that imports those libraries once (:data:`PRELOADED`), then runs the
command with ``CHESTSSL_PRELOAD`` naming the server's socket. A stage that finds it
(:func:`chestssl.cli.run_stage`) sends the server its command line, working directory,
environment, umask and standard streams (the file descriptors themselves, ``SCM_RIGHTS``);
the server forks a process that already holds the imports and runs the stage script in it
as ``python <script> <args>`` would; the stage process forwards the signals it receives to
that process and exits with its exit status. This is the zygote pattern (Android's zygote,
the ``forkserver`` start method of :mod:`multiprocessing`).

What makes the forked process run the stage as a fresh interpreter would:

- The server imports only third-party libraries, never the project's own modules beyond
  this one: before the stage runs, every ``chestssl`` module is dropped from
  ``sys.modules`` and ``sys.path`` is rebuilt from the stage's script folder and
  ``PYTHONPATH``, so the stage imports the code DVC hashed, from where it would.
- The server declines, and the stage runs in its own interpreter as before, when the
  stage's interpreter differs from the server's or any environment variable read when the
  libraries are imported differs (thread counts, CPU dispatch, CUDA device selection,
  hash seed; :func:`import_environment`), or when anything in the exchange fails.
- The server never initialises CUDA (it refuses to serve if an import did), and it runs no
  threads, so a fork copies no lock held by another thread.
- Each stage runs in its own process group, killed with its children (data-loader workers)
  when the stage process goes away, whatever the reason.

Without ``CHESTSSL_PRELOAD`` (a plain ``dvc repro``, ``dvc exp run``) nothing changes; any
command can be wrapped: ``python -m chestssl.preload run -- dvc exp run -S seg_beta=25``.
Results are the same bytes either way (``tests/test_preload.py`` trains both ways, and the
end-to-end test reruns a stage of the preloaded DAG in its own interpreter);
``benchmarks/preload_startup.py`` measures what it saves.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

#: The environment variable naming the server's socket.
SOCKET_VARIABLE = "CHESTSSL_PRELOAD"
#: Set in a process the server forked (and inherited by its children): it runs its stage itself.
FORKED_VARIABLE = "CHESTSSL_PRELOADED"
#: The libraries the server imports: what training and evaluation stages spend their start on.
#: ``torch._inductor.config``: ``torch.use_deterministic_algorithms`` (every fit calls it)
#: imports it, about 1 s of every training stage otherwise.
PRELOADED = ("numpy", "scipy.ndimage", "scipy.stats", "pandas", "torch", "torch._inductor.config", "monai",
             "sklearn.linear_model", "sklearn.metrics", "matplotlib.figure", "seaborn", "tqdm.auto", "yaml",
             "pydantic")
#: Environment variables that libraries read when imported (exact names, then prefixes):
#: a stage whose values differ from the server's is not run by it.
IMPORT_VARIABLES = ("PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONOPTIMIZE", "GLIBC_TUNABLES", "LD_PRELOAD",
                    "LD_LIBRARY_PATH", "MPLBACKEND", "MPLCONFIGDIR")
IMPORT_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "GOTO", "KMP_", "GOMP_", "NPY_", "NUMPY_", "ATEN_", "TORCH",
                   "PYTORCH_", "CUDA_", "CUBLAS_", "CUDNN_", "NVIDIA_", "MONAI_", "NUMEXPR_", "VECLIB_")
_MAX_MESSAGE = 1 << 20  # bytes of one request (the environment); SOCK_SEQPACKET keeps messages whole
_KILL_GRACE_S = 5.0


def import_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The variables of ``environ`` that an import may read (:data:`IMPORT_VARIABLES`,
    :data:`IMPORT_PREFIXES`), without ours."""
    return {key: value for key, value in environ.items()
            if key in IMPORT_VARIABLES or key.startswith(IMPORT_PREFIXES)}


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _interpreter_flags() -> list[Any]:
    """What ``python -O``, ``-X dev``, ``-W`` ... set: a stage started with other flags than
    the server's runs in its own interpreter."""
    return [list(sys.flags), list(sys.warnoptions), sorted(map(str, sys._xoptions.items()))]


# ----------------------------------------------------------------------------- the stage's side


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode())


def _receive(sock: socket.socket) -> dict[str, Any] | None:
    data = sock.recv(_MAX_MESSAGE)
    return json.loads(data) if data else None


def run_in_server(argv: Sequence[str] | None = None) -> None:
    """Have the server run this stage process's script when ``CHESTSSL_PRELOAD`` names one;
    then exit with its status. Returns (and the caller runs the stage itself) when there is
    no server, this process is one the server forked, or the server declines or fails."""
    path = os.environ.get(SOCKET_VARIABLE)
    # torchrun's workers (LOCAL_RANK) stay its own children, which its agent watches.
    if not path or os.environ.get(FORKED_VARIABLE) or "LOCAL_RANK" in os.environ:
        return
    argv = list(sys.argv if argv is None else argv)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        umask = os.umask(0o022)
        os.umask(umask)
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                   "interpreter": _interpreter(), "flags": _interpreter_flags(),
                   "import_environment": import_environment(os.environ)}
        streams = []
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
                streams.append(fd)
            except OSError:  # a closed stream: the stage gets /dev/null instead
                streams.append(os.open(os.devnull, os.O_RDWR))
        socket.send_fds(sock, [json.dumps(request).encode()], streams)
        reply = _receive(sock)
    except (OSError, ValueError) as error:
        print(f"preload: the server at {path} did not answer ({error}); running without it", file=sys.stderr)
        return
    if reply is None or "pid" not in reply:
        reason = reply.get("declined", "no reason given") if reply else "the server closed the connection"
        print(f"preload: not run by the server ({reason}); running without it", file=sys.stderr)
        sock.close()
        return
    _relay(sock, int(reply["pid"]))


def _relay(sock: socket.socket, pid: int) -> None:
    """Forward signals to the forked stage (over the socket: the server owns it) until its
    status arrives; then exit with it, or die of the signal that ended it."""
    def forward(signum, _frame):
        with contextlib.suppress(OSError):  # the server is gone: the status read below says so
            _send(sock, {"signal": signum})

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    while True:
        try:
            reply = _receive(sock)
        except InterruptedError:
            continue
        except OSError as error:
            reply = None
            print(f"preload: lost the server while stage process {pid} ran ({error})", file=sys.stderr)
        if reply is None:
            print(f"preload: stage process {pid} ended without a status", file=sys.stderr)
            os._exit(1)
        if "exit" in reply:
            sys.stdout.flush()
            sys.stderr.flush()
            if reply.get("signal"):
                signum = int(reply["signal"])
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            os._exit(int(reply["exit"]))


# ----------------------------------------------------------------------------- the server's side


class _Server:
    """Accepts stage requests on a listening socket (:meth:`serve`); one forked supervisor per
    request. ``parent``: the pid whose end ends the server."""

    def __init__(self, parent: int | None):
        self.parent = parent
        # sys.path without the server's own first entry and PYTHONPATH: what every
        # interpreter of this installation adds after a script's folder and PYTHONPATH.
        own = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
        self.base_path = [p for p in sys.path[1:] if os.path.abspath(p) not in own]
        self.import_environment = import_environment(os.environ)
        self.interpreter = _interpreter()
        self.refusal = ""

    def preload(self) -> None:
        for name in PRELOADED:
            try:
                importlib.import_module(name)
            except Exception:  # not installed, or broken: the stage imports it itself
                continue
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # a forked child could not use CUDA
            self.refusal = "an import initialised CUDA in the server"

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(1.0)
        while True:
            self._reap()
            if self.parent is not None and os.getppid() != self.parent:
                return  # the command that started the server is gone
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    listener.close()
                    code = self._supervise(conn)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            conn.close()

    @staticmethod
    def _reap() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _decline(self, request: dict[str, Any]) -> str:
        if self.refusal:
            return self.refusal
        if request.get("interpreter") != self.interpreter:
            return f"interpreter {request.get('interpreter')} is not the server's {self.interpreter}"
        if request.get("flags") != json.loads(json.dumps(_interpreter_flags())):
            return "interpreter flags (-O, -X, -W ...) differ from the server's"
        theirs = request.get("import_environment") or {}
        differ = sorted(k for k in {*theirs, *self.import_environment} if theirs.get(k) != self.import_environment.get(k))
        if differ:
            return "environment variables read at import differ: " + ", ".join(differ)
        return ""

    def _supervise(self, conn: socket.socket) -> int:
        """In a child of the server: fork the stage, then relay its signals and status."""
        data, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
        request = json.loads(data)
        reason = self._decline(request) if len(fds) == 3 else "the standard streams did not arrive"
        if reason:
            _send(conn, {"declined": reason})
            return 0
        stage = os.fork()
        if stage == 0:
            conn.close()
            self._run_stage(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(stage)

        def end_stage(*_):  # this supervisor is told to go: its stage goes with it
            _kill_group(stage, pidfd)
            os._exit(1)

        signal.signal(signal.SIGTERM, end_stage)
        signal.signal(signal.SIGHUP, end_stage)
        _send(conn, {"pid": stage})
        return self._wait(conn, stage, pidfd)

    @staticmethod
    def _wait(conn: socket.socket, stage: int, pidfd: int) -> int:
        while True:
            readable, _, _ = select.select([conn, pidfd], [], [])
            if pidfd in readable:
                _, status = os.waitpid(stage, 0)
                signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                with contextlib.suppress(OSError):  # the stage process is gone: no one to tell
                    _send(conn, {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + signum,
                                 "signal": signum})
                return 0
            try:
                message = _receive(conn)
            except OSError:
                message = None
            if message is None:  # the stage process is gone: so is its stage
                _kill_group(stage, pidfd)
                return 0
            if "signal" in message:
                with contextlib.suppress(ProcessLookupError):  # it has just ended; its status follows
                    os.killpg(stage, int(message["signal"]))

    def _run_stage(self, request: dict[str, Any], fds: list[int]) -> None:
        """In the forked stage process: become ``python <argv...>`` in the request's
        directory and environment, run the script, exit with its status."""
        code = 1
        try:
            gc.enable()
            os.setpgid(0, 0)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE,
                           signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as in python
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as python sets it
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            env = dict(request["env"])
            env[FORKED_VARIABLE] = "1"
            env.pop(SOCKET_VARIABLE, None)
            os.environ.clear()
            os.environ.update(env)
            os.umask(int(request["umask"]))
            os.chdir(request["cwd"])
            unbuffered = bool(env.get("PYTHONUNBUFFERED"))
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="strict")
            sys.stdout = _text_stream(1, unbuffered)
            sys.stderr = _text_stream(2, True, errors="backslashreplace")
            argv = [str(a) for a in request["argv"]]
            script = os.path.abspath(argv[0])
            python_path = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[:] = [os.path.dirname(script), *python_path, *self.base_path]
            sys.argv = argv
            for name in [n for n in sys.modules if n == "chestssl" or n.startswith("chestssl.")]:
                del sys.modules[name]
            importlib.invalidate_caches()
            code = _run_script(script)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def _text_stream(fd: int, line_buffering: bool, errors: str = "strict") -> io.TextIOWrapper:
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors,
                            line_buffering=line_buffering or os.isatty(fd), write_through=line_buffering)


def _run_script(script: str) -> int:
    """Run ``script`` as ``__main__``; its exit status as the interpreter would give it."""
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _kill_group(pgid: int, pidfd: int) -> None:
    """SIGTERM the stage's process group, SIGKILL it after a grace period; reap the stage."""
    with contextlib.suppress(ProcessLookupError):  # the group has ended already
        os.killpg(pgid, signal.SIGTERM)
        if not select.select([pidfd], [], [], _KILL_GRACE_S)[0]:
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, 0)


def serve(path: str, parent: int | None = None) -> None:
    """Listen on ``path`` (bound before the imports, so that early requests wait for them),
    preload, and serve until ``parent`` (a pid) is gone or a SIGTERM arrives."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # As the gc module's documentation advises before fork without exec: no collection in the
    # server (no freed holes in its pages), its objects frozen out of the children's
    # collections, so that those do not write to, hence copy, the pages they share.
    gc.disable()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(path)
        listener.listen(64)
        server = _Server(parent)
        server.preload()
        gc.freeze()
        server.serve(listener)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def run(command: Sequence[str]) -> int:
    """Run ``command`` with a server (its socket in ``CHESTSSL_PRELOAD``); its exit status.
    Where the server cannot work (it needs Linux: ``pidfd_open``, ``SOCK_SEQPACKET``), the
    command runs as it is."""
    if not (hasattr(os, "pidfd_open") and hasattr(socket, "SOCK_SEQPACKET") and hasattr(socket, "send_fds")):
        return subprocess.call(list(command))
    folder = tempfile.mkdtemp(prefix="chestssl-preload-")
    path = os.path.join(folder, "socket")
    # Its own session: a Ctrl-C at the terminal reaches the stages through their stage
    # processes (which forward it), not the server and its supervisors.
    server = subprocess.Popen([sys.executable, "-m", "chestssl.preload", "serve", path, "--parent", str(os.getpid())],
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(200):  # the socket appears within a second; stages arriving later queue on it
            if os.path.exists(path) or server.poll() is not None:
                break
            time.sleep(0.01)
        env = {**os.environ, SOCKET_VARIABLE: path} if server.poll() is None else dict(os.environ)
        try:
            child = subprocess.Popen(list(command), env=env)
        except OSError as error:
            print(f"error: cannot run {command[0]!r} ({error.strerror}); give the command to run, e.g. "
                  "python -m chestssl.preload run -- dvc repro", file=sys.stderr)
            return 127
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the terminal's SIGINT reached the command too; wait for it
                continue
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        with contextlib.suppress(FileNotFoundError):  # the server removes its socket when it can
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestssl.preload", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    run_parser = commands.add_parser("run", help="run a command (e.g. dvc repro) whose stages the server runs")
    run_parser.add_argument("command", nargs=argparse.REMAINDER)
    serve_parser = commands.add_parser("serve", help="the server itself (started by run)")
    serve_parser.add_argument("socket")
    serve_parser.add_argument("--parent", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.action == "serve":
        serve(args.socket, args.parent)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run: give the command, e.g. python -m chestssl.preload run -- dvc repro")
    return run(command)


if __name__ == "__main__":
    sys.exit(main())
