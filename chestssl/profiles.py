"""Profiles: a YAML file of overrides deep-merged into the params files.

``python -m chestssl.profiles params/lidc-full.yaml`` rewrites ``params.yaml`` and the
params files next to it (``chestssl.params.PARAMS_FILES``) with the overrides applied,
each group in its own file (comments and key order kept), after validating the result;
then ``dvc repro`` (or ``dvc exp run``) runs what changed. Override entries under
``methods`` and ``runs`` merge into the entry of the same name; a new name adds an entry.

A profile's top-level ``include:`` lists profiles (paths relative to its own folder) applied
before it, in order (``params/lidc-full.yaml`` includes ``params/all-entries.yaml``, the entries
the quick profile leaves out); its ``remove:`` lists dotted keys deleted next, where present (an entry
the profile's protocol does not run, e.g. ``radiograph_runs.cxr_densenet121``), and ``--set KEY=VALUE``
(repeatable; VALUE is YAML) sets a key after the profile, for what only the user knows:

    python -m chestssl.profiles params/cxr-chexpert.yaml --set data.cxr.root=/data/CheXpert-v1.0-small
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml as yaml_values
from ruamel.yaml import YAML

from chestssl.io import write_text
from chestssl.params import PARAMS_FILES, ParamsError, params_file_of, read_raw_params, read_yaml, validate


def merge_profile(base: Any, overrides: Any) -> Any:
    """Deep-merge ``overrides`` into ``base`` in place (mappings merge; anything else replaces;
    an equal value is left as it is, with its comments and layout, so a profile applies twice)."""
    if not isinstance(base, Mapping) or not isinstance(overrides, Mapping):
        return overrides
    for key, value in overrides.items():
        if key in base and isinstance(base[key], Mapping) and isinstance(value, Mapping):
            merge_profile(base[key], value)
        elif key not in base or base[key] != value:
            base[key] = value
            _copy_comment(overrides, base, key)
    return base


def _copy_comment(source: Any, target: Any, key: Any) -> None:
    """The comment after ``key``'s line in the profile, kept beside the key in the params file
    (ruamel.yaml holds it in the parent mapping, not in the value)."""
    comment = getattr(getattr(source, "ca", None), "items", {}).get(key)
    if comment is not None and hasattr(target, "ca"):
        target.ca.items[key] = comment


#: The top-level key of a profile that lists dotted keys to delete before merging.
REMOVE_KEY = "remove"
#: The top-level key of a profile that lists profiles applied before it.
INCLUDE_KEY = "include"


def _parent_of(documents: Mapping[str, Any], dotted: str, source: str, create: bool = False) -> tuple[Any, str, str]:
    """(the mapping holding the last part of ``dotted``, that part, its params file's name)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ParamsError([f"{dotted!r}: not a dotted key such as data.cxr.root"], source)
    name = params_file_of(parts[0])
    node: Any = documents[name]
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, Mapping) or part not in node:
            if create and isinstance(node, Mapping):
                node[part] = {}
            else:
                raise ParamsError([f"{dotted}: no key {'.'.join(parts[:depth + 1])} in the params"], source)
        node = node[part]
    if not isinstance(node, Mapping):
        raise ParamsError([f"{dotted}: {'.'.join(parts[:-1])} is not a mapping"], source)
    return node, parts[-1], name


def _string_list(value: Any, key: str, source: str) -> list[str]:
    """``value`` of the profile key ``key`` (``include:`` or ``remove:``): a list of strings, or none."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ParamsError([f"{key}: expected a list of {'profile paths' if key == INCLUDE_KEY else 'dotted keys'}, "
                           f"got {value!r}"], source)
    return value


def _merge_profile_into(documents: dict[str, Any], profile: Path, changed: set[str], seen: tuple[Path, ...] = ()) -> None:
    """Apply ``profile`` (its includes, then its removals, then its overrides) to ``documents``."""
    profile = Path(profile)
    if profile.resolve() in seen:
        chain = " -> ".join(str(path) for path in (*seen, profile.resolve()))
        raise ParamsError([f"{INCLUDE_KEY}: profiles include each other ({chain})"], str(profile))
    if not profile.is_file():
        raise FileNotFoundError(f"{profile}: no such profile" + (f" (included by {seen[-1]})" if seen else ""))
    read_yaml(profile)  # a syntax error or a duplicate key, named with its line
    overrides = _round_trip_yaml().load(profile.read_text()) or {}  # entries added keep their layout and comments
    if not isinstance(overrides, Mapping):
        raise ParamsError([f"the profile holds a {type(overrides).__name__}, expected a mapping of groups to values"],
                          str(profile))
    for included in _string_list(overrides.pop(INCLUDE_KEY, None), INCLUDE_KEY, str(profile)):
        _merge_profile_into(documents, profile.parent / included, changed, (*seen, profile.resolve()))
    for dotted in _string_list(overrides.pop(REMOVE_KEY, None), REMOVE_KEY, str(profile)):
        try:
            parent, key, name = _parent_of(documents, dotted, f"{profile}: {REMOVE_KEY}")
        except ParamsError:
            continue  # a key already absent is as the profile wants it (so a profile applies twice)
        if key in parent:
            del parent[key]
            changed.add(name)
    for group, value in overrides.items():
        name = params_file_of(str(group))
        documents[name][group] = merge_profile(documents[name].get(group), value)
        changed.add(name)


def _round_trip_yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps comments and order
    yaml.preserve_quotes = True
    yaml.width = 120  # the params files' line length: a flow mapping is folded only past it
    return yaml


def _params_files(params_path: Path) -> dict[str, Path]:
    """File name -> path of ``params_path`` and the params files next to it, checked first."""
    read_raw_params(params_path)  # a syntax error, a duplicate key or a misplaced group, named with its file
    return {name: params_path if name == "params.yaml" else params_path.parent / name
            for name in ["params.yaml", *PARAMS_FILES]}


def params_with_profile(profile: str | Path, params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """The raw params (all groups merged, entries naming their presets) with ``profile`` applied,
    in memory: what :func:`apply_profile` would write, without validating or writing it."""
    yaml = _round_trip_yaml()
    documents = {name: yaml.load(file.read_text()) for name, file in _params_files(Path(params_path)).items()}
    _merge_profile_into(documents, Path(profile), set())
    return _plain({group: value for document in documents.values() for group, value in document.items()})


def apply_profile(profile: str | Path, params_path: str | Path = "params.yaml", settings: Sequence[str] = ()) -> None:
    """Apply ``profile`` (its ``include:`` profiles, its ``remove:`` keys, then its overrides),
    then each ``KEY=VALUE`` of ``settings``, to ``params_path`` and the params files next to it;
    validated before writing."""
    files, documents = _load_documents(Path(params_path))
    changed: set[str] = set()
    _merge_profile_into(documents, Path(profile), changed)
    changed |= _set_values(documents, settings)
    _validate_and_write(documents, files, changed, f"{params_path} with {profile}")


def apply_settings(params_path: str | Path, settings: Sequence[str]) -> None:
    """Each ``KEY=VALUE`` of ``settings`` (a dotted key; VALUE is YAML), as ``--set`` after a
    profile, applied to ``params_path`` and the params files next to it; validated before writing."""
    files, documents = _load_documents(Path(params_path))
    _validate_and_write(documents, files, _set_values(documents, settings), str(params_path))


def _load_documents(params_path: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """(file name -> path, file name -> its round-trip YAML document) of the params files."""
    yaml = _round_trip_yaml()
    files = _params_files(params_path)
    return files, {name: yaml.load(file.read_text()) for name, file in files.items()}


def _set_values(documents: dict[str, Any], settings: Sequence[str]) -> set[str]:
    """Set each ``KEY=VALUE`` of ``settings`` in ``documents``; the names of the files changed."""
    changed = set()
    for setting in settings:
        dotted, equals, text = setting.partition("=")
        if not equals:
            raise ParamsError([f"{setting!r}: expected KEY=VALUE, e.g. data.cxr.root=/data/CheXpert-v1.0-small"],
                              "--set")
        parent, key, name = _parent_of(documents, dotted.strip(), "--set", create=True)
        parent[key] = yaml_values.safe_load(text) if text.strip() else ""
        changed.add(name)
    return changed


def _validate_and_write(documents: dict[str, Any], files: Mapping[str, Path], changed: set[str], source: str) -> None:
    """Validate the params ``documents`` together, then write the files named in ``changed``."""
    merged = {group: value for document in documents.values() for group, value in document.items()}
    validate(_plain(merged), source)
    yaml = _round_trip_yaml()
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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="set a key after the profile (VALUE is YAML), e.g. data.cxr.root=/data/CheXpert-v1.0-small")
    args = parser.parse_args(argv)
    try:
        apply_profile(args.profile, args.params, args.settings)
    except (ParamsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"applied {args.profile} to {args.params} and the params files next to it; "
          "run `dvc repro` (or `dvc exp run`) next")


if __name__ == "__main__":
    main()
