"""Stages that train nothing start without torch and MONAI.

Importing torch and MONAI takes seconds (``import monai`` loads every MONAI subpackage),
which ``download``, ``preprocess``, ``radiographs`` and ``report`` should not pay before
they start working. Each is checked in a fresh interpreter: its script, its
:mod:`chestssl.pipeline` module and every ``chestssl`` module that module imports (also
inside its function) are imported, as the stage does before it reads its inputs; then
neither ``torch`` nor ``monai`` may be in ``sys.modules``. (What a stage's work imports
later, e.g. MONAI for the report's per-image SSIM, is not checked; see
``benchmarks/stage_startup.py``.)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Starts stage processes that import torch and MONAI: scheduled early (tests/conftest.py).
pytestmark = pytest.mark.starts_stages

REPO_ROOT = Path(__file__).resolve().parents[1]
NON_TRAINING = ("download", "preprocess", "radiographs", "report")
HEAVY = ("torch", "monai")


def _project_imports(path: Path) -> list[str]:
    """The ``chestssl`` modules ``path`` imports anywhere (module level or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("chestssl"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("chestssl")]
    return sorted(set(found))


def _loaded_after_setup(stage: str) -> tuple[list[str], list[str]]:
    """(modules imported, heavy modules then in ``sys.modules``) in a fresh interpreter."""
    script = REPO_ROOT / "stages" / f"{stage}.py"
    pipeline = REPO_ROOT / "chestssl" / "pipeline" / f"{stage}.py"
    modules = sorted({*_project_imports(script), *_project_imports(pipeline)})
    code = (
        "import importlib, json, runpy, sys\n"
        f"runpy.run_path({str(script)!r}, run_name='stage')\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps([name for name in {list(HEAVY)!r} if name in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return modules, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", NON_TRAINING)
def test_a_stage_that_trains_nothing_imports_neither_torch_nor_monai(stage):
    modules, heavy = _loaded_after_setup(stage)
    assert f"chestssl.pipeline.{stage}" in modules
    assert not heavy, f"{stage}: importing {', '.join(modules)} loads {', '.join(heavy)}"


def test_the_check_sees_torch_where_a_stage_uses_it():
    # The pipeline functions import their modules inside the function; the check must
    # import those too, or the test above would pass without loading them.
    modules, heavy = _loaded_after_setup("evaluate")
    assert {"chestssl.tasks", "chestssl.eval.downstream"} <= set(modules)
    assert heavy == list(HEAVY)
