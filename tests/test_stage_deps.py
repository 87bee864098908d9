"""Every module a stage script imports (directly or through other modules) is one of
that stage's ``deps`` in dvc.yaml, so that editing it reruns the stage.

Only plumbing that cannot change a stage's outputs is exempt: argument and error
handling, path names, params validation, atomic writes, the array cache (it stores what
other modules compute, keyed by all their inputs), the preload server (where the stage's
process comes from; tests/test_preload.py checks the same bytes come out) and package
``__init__`` files that only re-export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

PLUMBING = {
    "chestssl/__init__.py",
    "chestssl/checks.py",
    "chestssl/cli.py",
    "chestssl/errors.py",
    "chestssl/io.py",
    "chestssl/model_files.py",
    "chestssl/params.py",
    "chestssl/schema.py",
    "chestssl/paths.py",
    "chestssl/preload.py",
    "chestssl/data/array_cache.py",
    "chestssl/data/__init__.py",
    "chestssl/eval/__init__.py",
    "chestssl/ablations/__init__.py",
    "chestssl/pipeline/__init__.py",
}


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else None


def _imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere, including inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names if alias.name.startswith("chestssl"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("chestssl"):
            modules.add(node.module)
            # `from chestssl import paths` imports a module, not a name.
            modules.update(f"{node.module}.{alias.name}" for alias in node.names
                           if _module_file(f"{node.module}.{alias.name}"))
    return modules


def _import_closure(script: Path) -> set[str]:
    """Repository-relative files of every project module ``script`` loads, packages included."""
    seen: set[Path] = set()
    pending = [script]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported_modules(path):
            parts = module.split(".")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
            pending.extend(f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i]))))
    return {path.relative_to(REPO_ROOT).as_posix() for path in seen}


STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_a_dependency(stage):
    definition = STAGES[stage].get("do", STAGES[stage])
    script = next(word for word in definition["cmd"].split() if word.endswith(".py"))
    deps = [str(dep).rstrip("/") for dep in definition["deps"]]
    assert script in deps, f"{stage}: its script {script} is not among its deps"

    def covered(path: str) -> bool:
        return any(path == dep or path.startswith(dep + "/") for dep in deps)

    missing = sorted(p for p in _import_closure(REPO_ROOT / script) - PLUMBING if not covered(p))
    assert not missing, f"{stage}: imports {missing} but does not list them (or their folder) as deps in dvc.yaml"


def test_the_import_walk_follows_imports_inside_functions():
    # stages/download.py imports the phantom generator inside a function; missing it
    # would let the check pass vacuously.
    closure = _import_closure(REPO_ROOT / "stages" / "download.py")
    assert {"chestssl/data/phantom.py", "chestssl/data/idc.py", "chestssl/data/tcia.py", "chestssl/data/local.py"} <= closure


def test_every_report_input_folder_exists_without_any_run():
    # `dvc repro` refuses a stage whose dependency is missing; an empty list in params
    # (say `label_fraction.runs: []`) writes nothing into that folder.
    folders = [dep for dep in STAGES["report"]["deps"] if dep.startswith("reports/")]
    assert folders
    for folder in folders:
        assert (REPO_ROOT / folder / "README.md").is_file(), f"{folder}/README.md is missing"


def test_the_committed_lock_records_only_stages_dvc_yaml_defines():
    # DVC keeps the lock entry of a stage that left dvc.yaml (a renamed method, a tiny
    # profile's run); each one costs every `dvc status` its parse and misleads a reader.
    from dvc.repo import Repo

    with Repo(str(REPO_ROOT)) as repo:
        defined = {stage.addressing for stage in repo.index.stages}
    locked = set(yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())["stages"])
    assert locked - defined == set(), "dvc.lock holds stages dvc.yaml no longer defines; delete their entries"


def test_the_committed_reports_hold_only_what_the_locked_stages_wrote():
    # A metrics or curve file of an entry that left the params lists stays in git when the
    # entry goes, and `dvc metrics show` / `dvc plots show` then list its numbers, from data
    # that no longer exist, beside the current ones.
    import subprocess

    listed = subprocess.run(["git", "ls-files", "reports"], cwd=REPO_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    outs = [out["path"] for stage in yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())["stages"].values()
            for out in stage.get("outs", [])]
    # written outside the DAG: folder notes, benchmark figures, the full profile's cost table (`make cost`)
    kept_apart = ("reports/benchmarks/", "reports/cost.md", "reports/cost.csv")

    def written_by_a_stage(path: str) -> bool:
        if path.endswith("/.gitignore"):  # DVC's, beside the cached outputs of a folder
            folder = path.rsplit("/", 1)[0] + "/"
            return any(out.startswith(folder) for out in outs)
        return any(path == out or path.startswith(out.rstrip("/") + "/") for out in outs)

    stale = [path for path in listed.stdout.split() if not path.endswith("/README.md")
             and not path.startswith(kept_apart) and not written_by_a_stage(path)]
    assert stale == [], f"{len(stale)} files under reports/ no stage of dvc.lock writes, e.g. {stale[:5]}; git rm them"
