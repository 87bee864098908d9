"""Profiles: a YAML file of overrides deep-merged into the params files.

``python -m chestssl.profiles params/lidc-full.yaml`` rewrites ``params.yaml`` and the
params files next to it (``chestssl.params.PARAMS_FILES``) with the overrides applied,
each group in its own file (comments and key order kept), after validating the result;
then ``dvc repro`` (or ``dvc exp run``) runs what changed. Override entries under
``methods`` and ``runs`` merge into the entry of the same name; a new name adds an entry.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any, Mapping

from ruamel.yaml import YAML

from chestssl.io import write_text
from chestssl.params import PARAMS_FILES, ParamsError, params_file_of, read_raw_params, read_yaml, validate


def merge_profile(base: Any, overrides: Any) -> Any:
    """Deep-merge ``overrides`` into ``base`` in place (mappings merge; anything else replaces)."""
    if not isinstance(base, Mapping) or not isinstance(overrides, Mapping):
        return overrides
    for key, value in overrides.items():
        if key in base and isinstance(base[key], Mapping) and isinstance(value, Mapping):
            merge_profile(base[key], value)
        else:
            base[key] = value
    return base


def apply_profile(profile: str | Path, params_path: str | Path = "params.yaml") -> None:
    yaml = YAML()  # round-trip: keeps comments and order
    yaml.preserve_quotes = True
    params_path = Path(params_path)
    read_raw_params(params_path)  # a syntax error, a duplicate key or a misplaced group, named with its file
    files = {name: params_path if name == "params.yaml" else params_path.parent / name
             for name in ["params.yaml", *PARAMS_FILES]}
    documents = {name: yaml.load(file.read_text()) for name, file in files.items()}
    overrides = read_yaml(profile) or {}
    changed = set()
    for group, value in overrides.items():
        name = params_file_of(str(group))
        documents[name][group] = merge_profile(documents[name].get(group), value)
        changed.add(name)
    merged = {group: value for document in documents.values() for group, value in document.items()}
    validate(_plain(merged), f"{params_path} with {profile}")
    for name in sorted(changed):
        buffer = io.StringIO()
        yaml.dump(documents[name], buffer)
        write_text(files[name], buffer.getvalue())


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a YAML file of overrides, e.g. params/lidc-full.yaml")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        apply_profile(args.profile, args.params)
    except (ParamsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"applied {args.profile} to {args.params} and the params files next to it; "
          "run `dvc repro` (or `dvc exp run`) next")


if __name__ == "__main__":
    main()
