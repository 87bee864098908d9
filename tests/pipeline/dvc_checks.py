"""What the end-to-end tests read from DVC: the stages a run ran or restored, the stages
`dvc status` and `dvc dag` find out of date, and the digests of outputs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

#: What DVC logs for a stage that its run-cache restores (dvc/stage/cache.py).
RUN_CACHE_HIT = re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs")


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def out_of_date(project) -> set[str]:
    """The stages `dvc repro` would run: those whose own dependencies `dvc status` finds
    changed, and every stage downstream of one of them in `dvc dag`."""
    changed = set(json.loads(project.dvc_run("status", "--json").stdout or "{}"))
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', project.dvc_run("dag", "--dot").stdout, re.MULTILINE)
    assert edges, "dvc dag --dot printed no edges"
    stale, pending = set(), list(changed)
    while pending:
        stage = pending.pop()
        if stage not in stale:
            stale.add(stage)
            pending.extend(child for parent, child in edges if parent == stage)
    return stale


def params_files(project) -> list[str]:
    """The params files (``params.yaml`` and the ``params`` folder where there is one)."""
    return [name for name in ("params.yaml", "params") if (project.root / name).exists()]


def restore_params(project) -> None:
    """Put the params files back as committed."""
    project.run("git", "checkout", "--", *params_files(project))


def out_of_date_after(project, change) -> set[str]:
    """Apply ``change`` to the params, return :func:`out_of_date`, put the params back."""
    params = project.params()
    change(params)
    project.write_params(params)
    try:
        return out_of_date(project)
    finally:
        restore_params(project)


def copy_path(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of the file or folder ``src``."""
    if dst.is_dir():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def file_digests(root: Path, folders) -> dict[str, str]:
    """SHA-256 of every file under ``folders`` (relative to ``root``), by relative path."""
    digests = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                digests[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


