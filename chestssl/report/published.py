"""The seeds' published numbers that the report quotes beside ours, read from ``published.yaml``.

Every number a seed published and the report quotes lives in one data file,
``chestssl/report/published.yaml`` (its layout is described at its top), with the seed,
the report table it belongs to, the metric, the dataset, how the seed's protocol differs
from ours, and where the seed published it. The report modules look records up here
instead of spelling numbers out:

- by id: ``published()["seed000_reconstruction.swin_transformer.ssim"]``;
- by what they are: ``published().find(table="frozen_parts", row="fc only")``, or every
  record of a table's row in file order with :meth:`Published.select`.

The file is checked when read: a record missing a field, with an unknown field, a value
that is not a number written as text, a seed other than ``"000"`` .. ``"004"`` or the
same (seed, table, row, setting, metric) as another record is an error naming the record;
looking up an id or a description that matches no record is an error naming what was
asked for.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

from chestssl.errors import UserError
from chestssl.params import read_yaml

#: The data file shipped with the package (package data of ``chestssl.report``).
PUBLISHED_FILE = Path(__file__).with_name("published.yaml")
SEEDS = ("000", "001", "002", "003", "004")


class PublishedError(UserError, ValueError):
    """``published.yaml`` is malformed, or a lookup matches no record (or several)."""


@dataclass(frozen=True)
class Record:
    """One published number.

    Attributes:
        id: the record's key in the file, stable: code refers to it.
        value: the number as the report quotes it, as text (``"0.9250"`` keeps its zero).
        seed: ``"000"`` .. ``"004"``.
        table: the report table (or family of tables) that quotes it.
        row: the seed's row (or our method) the number belongs to in that table.
        metric: what was measured.
        dataset: the seed's data.
        protocol: how the seed's protocol differs from ours where it matters.
        source: where the seed published it (its README section).
        setting: what distinguishes numbers of one row and metric (e.g. a label share);
            empty where nothing does.
    """

    id: str
    value: str
    seed: str
    table: str
    row: str
    metric: str
    dataset: str
    protocol: str
    source: str
    setting: str = ""

    @property
    def number(self) -> float:
        """:attr:`value` as a float."""
        return float(self.value)


#: Fields every record must give (``id`` is its key); ``setting`` is optional.
REQUIRED_FIELDS = tuple(f.name for f in fields(Record) if f.name not in ("id", "setting"))
_ALL_FIELDS = set(REQUIRED_FIELDS) | {"setting"}
#: The fields a lookup may match on.
_MATCH_FIELDS = ("seed", "table", "row", "setting", "metric")


def _check_record(record_id: Any, raw: Any) -> list[str]:
    """Problems of one raw record, each naming it."""
    where = f"record {record_id!r}"
    if not isinstance(record_id, str) or not record_id.strip():
        return [f"{where}: the id must be non-empty text"]
    if not isinstance(raw, Mapping):
        return [f"{where}: expected a mapping of fields ({', '.join(REQUIRED_FIELDS)}), got {type(raw).__name__}"]
    problems = []
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        problems.append(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(str(name) for name in raw if name not in _ALL_FIELDS)
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_ALL_FIELDS))}")
    for name in _ALL_FIELDS & set(raw):
        value = raw[name]
        if not isinstance(value, str) or (name != "setting" and not value.strip()):
            hint = " (quote it, e.g. seed: \"001\")" if name == "seed" else (
                " (quote it exactly as quoted in the report, e.g. value: \"0.9250\")" if name == "value" else "")
            problems.append(f"{where}: {name} must be non-empty text{hint}, got {value!r}")
    value = raw.get("value")
    if isinstance(value, str) and value.strip():
        try:
            float(value)
        except ValueError:
            problems.append(f"{where}: value {value!r} is not a number")
    seed = raw.get("seed")
    if isinstance(seed, str) and seed not in SEEDS:
        problems.append(f"{where}: seed {seed!r} is not one of {', '.join(SEEDS)}")
    return problems


class Published:
    """The records of one published-numbers file, by id, in file order."""

    def __init__(self, records: Mapping[str, Record], source: str):
        self.records = dict(records)
        self.source = source

    def __getitem__(self, record_id: str) -> Record:
        try:
            return self.records[record_id]
        except KeyError:
            close = difflib.get_close_matches(str(record_id), list(self.records), n=3)
            hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else "; add it or fix the id"
            raise PublishedError(f"{self.source} has no record {record_id!r}{hint}") from None

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records.values())

    def __len__(self) -> int:
        return len(self.records)

    def select(self, **match: str) -> list[Record]:
        """Every record whose fields equal ``match`` (any of seed, table, row, setting,
        metric), in file order; an error when none does."""
        unknown = sorted(set(match) - set(_MATCH_FIELDS))
        if unknown:
            raise TypeError(f"cannot look published records up by {', '.join(unknown)}; use {', '.join(_MATCH_FIELDS)}")
        found = [record for record in self if all(getattr(record, key) == value for key, value in match.items())]
        if not found:
            asked = ", ".join(f"{key}={value!r}" for key, value in match.items())
            raise PublishedError(f"{self.source} has no record with {asked}; add one or fix the lookup")
        return found

    def find(self, **match: str) -> Record:
        """The one record whose fields equal ``match``; an error when none or several do."""
        found = self.select(**match)
        if len(found) > 1:
            asked = ", ".join(f"{key}={value!r}" for key, value in match.items())
            raise PublishedError(f"{self.source}: {len(found)} records match {asked} "
                                 f"({', '.join(record.id for record in found)}); narrow the lookup")
        return found[0]

    def values(self, **match: str) -> dict[str, str]:
        """``{metric: value}`` of the records :meth:`select` returns (one per metric)."""
        found = self.select(**match)
        by_metric: dict[str, str] = {}
        for record in found:
            if record.metric in by_metric:
                raise PublishedError(f"{self.source}: several records of metric {record.metric!r} match "
                                     f"{match}; narrow the lookup")
            by_metric[record.metric] = record.value
        return by_metric


def read_published(path: str | os.PathLike = PUBLISHED_FILE) -> Published:
    """Read and check a published-numbers file (see the module docstring)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, Mapping) or set(raw) != {"records"} or not isinstance(raw["records"], Mapping):
        raise PublishedError(f"{path}: expected one top-level key `records` holding a mapping of record ids to records")
    problems: list[str] = []
    records: dict[str, Record] = {}
    seen: dict[tuple[str, ...], str] = {}
    for record_id, entry in raw["records"].items():
        found = _check_record(record_id, entry)
        if found:
            problems += found
            continue
        record = Record(id=record_id, **entry)
        key = tuple(getattr(record, name) for name in _MATCH_FIELDS)
        if key in seen:
            problems.append(f"record {record_id!r}: the same seed, table, row, setting and metric as "
                            f"record {seen[key]!r}; keep one or tell them apart by `setting`")
            continue
        seen[key] = record_id
        records[record_id] = record
    if problems:
        raise PublishedError(f"{path}:\n" + "\n".join(f"  - {problem}" for problem in problems))
    return Published(records, str(path))


@lru_cache(maxsize=None)
def _read_cached(path: str) -> Published:
    return read_published(path)


def published() -> Published:
    """The records of :data:`PUBLISHED_FILE`, read and checked once."""
    return _read_cached(str(PUBLISHED_FILE))
