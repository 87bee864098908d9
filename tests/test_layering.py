"""Imports point down only: every module of ``chestssl`` imports its own package or lower layers.

The layers, bottom to top (:data:`LAYERS`):

1. foundation: ``errors``, ``checks``, ``io``, ``params``, ``schema``, ``paths``, ``model_files``,
   ``profiles``, ``inference`` and the package itself (they may import each other);
2. ``data``: sources, preprocessing, datasets, collates, radiographs, geometry;
3. ``models``: networks and losses;
4. ``eval``: metrics, probes, bootstrap intervals;
5. ``methods`` and ``tasks``: what the loop trains (pretext methods, the STN objective;
   downstream task models), independent of each other;
6. ``train``: the training loop;
7. ``ablations``, ``interpret``, ``report``: what is built on trained models, independent
   of each other;
8. ``pipeline``: one function per DVC stage;
9. ``cli``, ``launch``, ``cost``: entry points (the stage scripts' behaviour, the launcher,
   the cost estimate).

A module may import its own package (e.g. ``chestssl.methods.multihead`` ->
``chestssl.methods.vqgan``) and anything in a lower layer; never a higher layer, nor a
sibling package of its own layer. Every import counts, including those inside functions
and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "chestssl"

#: (layer name, the packages or modules it holds), bottom first. A module belongs to the
#: longest entry that prefixes its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("chestssl", "chestssl.errors", "chestssl.checks", "chestssl.io", "chestssl.params",
                    "chestssl.paths", "chestssl.model_files", "chestssl.profiles", "chestssl.inference")),
    ("data", ("chestssl.data",)),
    ("models", ("chestssl.models",)),
    ("eval", ("chestssl.eval",)),
    ("methods and tasks", ("chestssl.methods", "chestssl.tasks")),
    ("training loop", ("chestssl.train",)),
    ("ablations, interpretation and report", ("chestssl.ablations", "chestssl.interpret", "chestssl.report")),
    ("stages", ("chestssl.pipeline",)),
    ("entry points", ("chestssl.cli", "chestssl.launch", "chestssl.cost")),
]
#: The foundation's modules import each other freely (they are one unit).
FOUNDATION = LAYERS[0][1]

#: Upward or sideways imports of ``chestssl.report`` modules that are known and waiting to be
#: fixed there, as (importing module, imported module). Empty when there are none.
KNOWN_REPORT_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = REPO_ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """The ``chestssl`` modules (or packages) that the code ``source`` of ``module`` imports anywhere."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "chestssl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            if source_module.split(".")[0] != "chestssl":
                continue
            for alias in node.names:
                # `from chestssl import paths` imports the module chestssl.paths.
                candidate = f"{source_module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else source_module)
    return found


def _imports(path: Path) -> set[str]:
    """The ``chestssl`` modules (or packages) the file ``path`` imports anywhere in its body."""
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _unit(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of a module: the unit is its top package, or the foundation."""
    best: tuple[int, str] | None = None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + "."):
                if best is None or len(member) > len(best[1]):
                    best = (index, member)
    if best is None:
        return None
    index, member = best
    return (index, "foundation") if member in FOUNDATION else (index, member)


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _violations() -> list[tuple[str, str, str]]:
    """(module, imported module, why) for every import that does not point down."""
    found = []
    for path in _modules():
        module = _module_name(path)
        mine = _unit(module)
        for imported in sorted(_imports(path)):
            theirs = _unit(imported)
            if mine is None or theirs is None or theirs[1] == mine[1] or theirs[0] < mine[0]:
                continue
            where = "a higher layer" if theirs[0] > mine[0] else "a sibling package of the same layer"
            found.append((module, imported, f"{imported} is in {where} ({LAYERS[theirs[0]][0]}; "
                                            f"{module} is in {LAYERS[mine[0]][0]})"))
    return found


def test_every_module_belongs_to_a_layer():
    unplaced = [_module_name(p) for p in _modules() if _unit(_module_name(p)) is None]
    assert not unplaced, f"modules without a layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_every_layer_entry_exists():
    missing = [member for _, members in LAYERS for member in members if not _is_module(member)]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def test_no_import_points_upward():
    problems = [f"{module} imports {imported}: {why}" for module, imported, why in _violations()
                if (module, imported) not in KNOWN_REPORT_EXCEPTIONS]
    assert not problems, "imports that do not point down:\n" + "\n".join(problems)


def test_known_report_exceptions_still_exist():
    # An exception that was fixed must leave the list, so the list only ever shrinks.
    current = {(module, imported) for module, imported, _ in _violations()}
    stale = sorted(KNOWN_REPORT_EXCEPTIONS - current)
    assert not stale, f"fixed, remove from KNOWN_REPORT_EXCEPTIONS: {stale}"
    assert all(module.startswith("chestssl.report") for module, _ in KNOWN_REPORT_EXCEPTIONS)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    from chestssl.pipeline.align_radiographs import align_radiographs\n",
         "chestssl.pipeline.align_radiographs"),
        ("import chestssl.train.loop as loop\n", "chestssl.train.loop"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from chestssl.train.loop import fit\n",
         "chestssl.train.loop"),
        ("from chestssl import pipeline\n", "chestssl.pipeline"),
        ("from ..methods import build_method\n", "chestssl.methods"),
    ],
)
def test_the_check_sees_local_type_checking_package_and_relative_imports(source, expected):
    # A data module that imported upward in any of these ways would be named.
    assert _imports_of(source, "chestssl.data.augment") == {expected}
    assert _unit(expected)[0] > _unit("chestssl.data.augment")[0]
