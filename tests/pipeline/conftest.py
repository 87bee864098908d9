"""A throwaway copy of the project in its own git repository, for real `dvc` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_FILES = ["chestssl", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvc/config", ".gitignore"]


def tiny_params(params: dict) -> dict:
    """The quick profile shrunk further: 8 small phantom scans, 32x32 slices, a few steps."""
    params["data"]["phantom"].update(num_scans=8, max_slices=100)
    params["preprocess"].update(spacing=[2.5, 2.0, 2.0], min_nodule_pixels=4, workers=1)
    params["slices"]["size"] = 32
    for entry in list(params["methods"].values()) + list(params["runs"].values()):
        if "backbone" in entry:
            entry["backbone"]["features"] = [4, 8, 8, 16, 16]
        if "train" in entry:
            entry["train"].update(epochs=1, max_steps=3, batch_size=8, log_every=1)
    params["evaluate"]["bootstrap_samples"] = 50
    params["report"]["num_examples"] = 2
    return params


class Project:
    """A copy of the project at ``root`` with methods that run git and dvc in it."""

    def __init__(self, root: Path):
        self.root = root
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.org",
                    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.org", "MPLBACKEND": "Agg"}
        self.dvc = [str(Path(bindir) / "dvc")]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def dvc_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(*self.dvc, *args, check=check)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)


def make_project(root: Path) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    project = Project(root)
    project.run("git", "init", "-q")
    project.dvc_run("init", "-q", "--force")
    shutil.copy2(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    project.write_params(tiny_params(project.params()))
    project.commit("tiny project")
    return project


@pytest.fixture(scope="module")
def reproduced_project(tmp_path_factory) -> Project:
    """The tiny project after one full `dvc repro`, committed."""
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    project.dvc_run("repro")
    project.commit("reproduced")
    return project
