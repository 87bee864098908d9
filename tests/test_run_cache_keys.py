"""DVC's run-cache must tell every params value apart.

``dvc repro`` and ``dvc exp run`` answer a stage from the run-cache when its code, data
and params hash as an earlier run's. DVC 3 computes that hash with keys named ``size``
and ``nfiles`` dropped at every depth (``dvc.stage.cache._get_cache_hash``), params
included: a stage whose ``slices.size`` changed was restored with the models of the old
size. These tests run DVC's own hash over every shipped profile.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import pytest
from dvc.stage.cache import _get_cache_hash

from chestssl.params import RUN_CACHE_BLIND_KEYS, ParamsError, run_cache_blind_keys, validate
from chestssl.profiles import params_with_profile
from tests.shipped_params import read_shipped_params

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(path.name for path in (ROOT / "params").glob("*.yaml")
                  if path.name.startswith(("cxr-", "lidc-", "all-")))


def _run_cache_hash(params: dict[str, Any]) -> str:
    """DVC's run-cache hash of a stage that reads ``params`` from params.yaml."""
    return _get_cache_hash({"cmd": "python stages/x.py", "params": {"params.yaml": copy.deepcopy(params)}})


def _leaves(tree: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(tree, list) and tree:
        for index, value in enumerate(tree):
            yield from _leaves(value, (*path, index))
    else:
        yield path


def _changed(tree: dict[str, Any], path: tuple) -> dict[str, Any]:
    changed = copy.deepcopy(tree)
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = {"changed from": node[path[-1]]}
    return changed


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_every_param_of_every_profile_changes_the_run_cache_hash(profile):
    raw = read_shipped_params() if profile is None else params_with_profile(ROOT / "params" / profile,
                                                                              ROOT / "params.yaml")
    before = _run_cache_hash(raw)
    blind = [".".join(map(str, path)) for path in _leaves(raw) if _run_cache_hash(_changed(raw, path)) == before]
    assert not blind, f"DVC's run-cache would not see a change of {blind}"


def test_the_keys_refused_are_the_ones_dvc_ignores():
    for key in RUN_CACHE_BLIND_KEYS:
        assert _run_cache_hash({"slices": {key: 64}}) == _run_cache_hash({"slices": {key: 96}})
    assert _run_cache_hash({"slices": {"side": 64}}) != _run_cache_hash({"slices": {"side": 96}})


def test_a_key_dvc_ignores_is_refused_wherever_it_is():
    raw = read_shipped_params()
    raw["slices"]["size"] = raw["slices"].pop("side")
    raw["methods"]["ae_swin"]["decoder"]["nfiles"] = 3
    with pytest.raises(ParamsError) as caught:
        validate(raw)
    assert caught.value.problems == run_cache_blind_keys(raw)
    assert [line.split(":")[0] for line in caught.value.problems] == ["slices.size", "methods.ae_swin.decoder.nfiles"]
    assert "run-cache ignores keys named 'size'" in str(caught.value) and "`side`" in str(caught.value)
    assert run_cache_blind_keys({"report": {"rows": [{"size": 1}]}}) == [
        "report.rows[0].size: DVC's run-cache ignores keys named 'size', so a change of it would restore results "
        "made with the old value; rename it (a side in pixels is `side`)"]
