"""The shipped params as written, and what the params check finds in a changed copy.

Method tests use them to show each rule of a method's config where a user meets it: a
change to a shipped entry is named in the problems by its full key path. The shipped
entries are the quick profile's and those params/all-entries.yaml adds (every seed table's).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chestssl.params import ParamsError, read_raw_params, validate
from chestssl.profiles import params_with_profile

ROOT = Path(__file__).resolve().parents[1]


#: The profile that adds the entries of the seeds' tables the quick profile leaves out.
ALL_ENTRIES_PROFILE = ROOT / "params" / "all-entries.yaml"


def read_shipped_params(all_entries: bool = True) -> dict:
    """``params.yaml`` and the params files next to it, merged, as written (entries name their
    presets); with ``all_entries``, params/all-entries.yaml applied (every seed table's entry)."""
    if all_entries:
        return params_with_profile(ALL_ENTRIES_PROFILE, ROOT / "params.yaml")
    return read_raw_params(ROOT / "params.yaml")[0]


def validate_with_method_configs(raw: dict) -> dict:
    """``raw`` validated as the stages that build methods validate it: every entry against its method's config."""
    from chestssl.methods import method_configs

    return validate(raw, method_configs=method_configs())


def params_problems(raw: dict) -> list[str]:
    """The problems :func:`validate_with_method_configs` finds in ``raw`` (there must be some)."""
    with pytest.raises(ParamsError) as error:
        validate_with_method_configs(raw)
    return error.value.problems


def problem_starting_with(raw: dict, beginning: str) -> str:
    """The one problem :func:`params_problems` lists for ``raw`` that starts with ``beginning``."""
    problems = params_problems(raw)
    matching = [problem for problem in problems if problem.startswith(beginning)]
    assert len(matching) == 1, f"expected one problem starting with {beginning!r}, got {problems}"
    return matching[0]
