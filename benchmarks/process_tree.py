"""A process and all its descendants, and their memory, read from ``/proc`` (Linux only).

- *PSS* (``/proc/<pid>/smaps_rollup``): each process's resident pages, a page shared by n
  processes counted 1/n in each, so the sum over a tree is what the tree holds.
- *RSS*: resident set sizes; summed over a tree, shared pages count once per process: an
  upper bound.

A process that ends between listing and reading counts as 0. Used by
``test_suite_cost.py`` and ``reproduce_cost.py``, which also write their figures with
:func:`write_atomic` (standard library only: they run before the project's environment exists).
"""

from __future__ import annotations

import os
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's children, from /proc)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(child) for child in fh.read().split())
    except OSError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(children(current))
    return pids


def command_line(pid: int, limit: int = 120) -> str:
    """The command line of ``pid``, cut to ``limit`` characters; "" once it has ended."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    except OSError:
        return ""


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it has ended."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key == "Rss":
                    rss = int(value.split()[0])
                elif key == "Pss":
                    pss = int(value.split()[0])
    except OSError:
        pass
    return rss, pss


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
