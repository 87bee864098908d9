"""Typed configs on pydantic, with the messages a params file's author needs.

A config is a :class:`Config` (a strict pydantic model: no unknown key, no silent
conversion). Its scalar fields are declared with :func:`Int`, :func:`Float`,
:func:`Str`, :func:`Bool` and :func:`List`, which carry a short description of what is
allowed; :func:`problems_of` turns a :class:`pydantic.ValidationError` into one line per
problem, each naming the full key path (``methods.ae_swin.train.epochs``), the value and
what is allowed::

    methods.ae_swin.train.epochs: got 0, expected an integer >= 1
    preprocess.spacingg: unknown key; allowed here: spacing, hu_window, ...

Floats accept integers and strings such as ``"1e-3"`` (YAML 1.1 readers, PyYAML among
them, leave those as strings); an integer is never a bool; NaN and infinities are refused.
"""

from __future__ import annotations

import types
from typing import Any, Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

#: The error type of the problems raised by this module's validators; their message is complete.
_PROBLEM = "chestssl_problem"
#: What entry and preset names may contain (a DVC stage name is built from them).
NAME_PATTERN = r"[A-Za-z0-9_-]+"
NAME_DOC = "letters, digits, '_' and '-'"


class Config(BaseModel):
    """Base of every typed config: unknown keys and loose types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def problem(message: str, key: str = "") -> PydanticCustomError:
    """An error whose ``message`` is shown as is, after the key path it was found at
    (extended by ``key``, for a model's check of one of its fields)."""
    return PydanticCustomError(_PROBLEM, "{message}", {"message": message, "key": key})


def _number_text(value: float) -> str:
    return f"{value:g}"


def _bounds(ge: float | None, gt: float | None, le: float | None, lt: float | None = None) -> str:
    bounds = []
    if gt is not None:
        bounds.append(f"> {_number_text(gt)}")
    elif ge is not None:
        bounds.append(f">= {_number_text(ge)}")
    if lt is not None:
        bounds.append(f"< {_number_text(lt)}")
    elif le is not None:
        bounds.append(f"<= {_number_text(le)}")
    return " and ".join(bounds)


def _described(base: Any, expected: str, doc: str, *constraints: Any, before=None) -> Any:
    """``base`` with ``constraints``, whose every error reads "got <value>, expected <expected> (<doc>)"."""
    text = f"{expected} ({doc})" if doc else expected

    def rephrase(value: Any, handler):
        if before is not None:
            value = before(value)
        try:
            return handler(value)
        except ValidationError:
            raise problem(f"got {value!r}, expected {text}") from None

    return Annotated[(base, *constraints, Field(description=text), WrapValidator(rephrase))]


def Int(ge: int | None = None, le: int | None = None, choices: tuple[int, ...] | None = None, doc: str = "") -> Any:
    """An integer (never a bool), optionally bounded or one of ``choices``."""
    if choices is not None:
        return _described(Literal[choices], "one of " + ", ".join(map(repr, choices)), doc)
    bounds = _bounds(ge, None, le)
    return _described(int, "an integer" + (f" {bounds}" if bounds else ""), doc, Field(ge=ge, le=le))


def _float_from_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def Float(ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
          doc: str = "") -> Any:
    """A finite number; integers and numeric strings are taken as floats."""
    bounds = _bounds(ge, gt, le, lt)
    return _described(float, "a number" + (f" {bounds}" if bounds else ""), doc,
                      Field(ge=ge, gt=gt, le=le, lt=lt, allow_inf_nan=False), before=_float_from_text)


def Str(choices: tuple[str, ...] | None = None, pattern: str | None = None, doc: str = "") -> Any:
    """A string, optionally one of ``choices`` or matching ``pattern`` (``doc`` then says what it allows)."""
    if choices is not None:
        return _described(Literal[choices], "one of " + ", ".join(map(repr, choices)), doc)
    return _described(str, "a str", doc, Field(pattern=f"^(?:{pattern})$" if pattern else None))


def Bool(doc: str = "") -> Any:
    """``true`` or ``false``."""
    return _described(bool, "true or false", doc)


def List(item: Any, length: int | None = None, doc: str = "") -> Any:
    """A list of ``item`` (one of this module's types), of ``length`` items if given.

    A wrong item is named by its index (``key[1]: got ...``); a value that is not a list, or
    a list of the wrong length, by the list's key.
    """
    item_text = _description(item) or "values"
    size = f"{length} " if length is not None else ""
    text = f"a list of {size}{_plural(item_text)}" + (f" ({doc})" if doc else "")

    def check_shape(value: Any, handler):
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise problem(f"got {value!r}, expected {text}")
        return handler(value)

    return Annotated[list[item], Field(description=text), WrapValidator(check_shape)]


def Nullable(spec: Any) -> Any:
    """``spec`` or null (``None``)."""
    return _described(Union[spec, None], f"{_description(spec)} or null", "")


def _plural(text: str) -> str:
    for singular, plural in (("an integer", "integers"), ("a number", "numbers"), ("a str", "strs"),
                             ("true or false", "booleans")):
        if text.startswith(singular):
            return plural + text[len(singular):]
    return text


def _description(annotation: Any) -> str:
    """The description stored in an ``Annotated`` type made by this module ("" if none)."""
    for meta in getattr(annotation, "__metadata__", ()):
        description = getattr(meta, "description", None)
        if description:
            return description
    return ""


def Names(value: Any, min_entries: int = 0, what: str = "entry") -> Any:
    """A map from user-chosen names (:data:`NAME_PATTERN`) to ``value`` (each an ``what``)."""
    plural = "entries" if what == "entry" else f"{what}s"
    return Annotated[dict[_named_key(what), value],
                     Field(min_length=min_entries, description=f"a mapping of named {plural}")]


def _named_key(what: str) -> Any:
    def check(value: Any, handler):
        try:
            return handler(value)
        except ValidationError:
            raise problem(f"{what} names may contain only {NAME_DOC}") from None

    return Annotated[str, Field(pattern=f"^{NAME_PATTERN}$"), WrapValidator(check)]


def Tagged(tag: str, *members: type[Config]) -> Any:
    """One of ``members``, picked by the value of their ``tag`` field (a ``Literal``)."""
    return Annotated[Union[members], Field(discriminator=tag)]


def tags(annotation: Any) -> dict[str, type[Config]]:
    """``{tag value: member}`` of a :func:`Tagged` type."""
    discriminator = next((meta.discriminator for meta in getattr(annotation, "__metadata__", ())
                          if getattr(meta, "discriminator", None)), None)
    if discriminator is None:
        return {}
    bare = _strip(annotation)
    members = (bare,) if _is_model(bare) else get_args(bare)  # a union of one is its member
    return {value: member for member in members for value in get_args(member.model_fields[discriminator].annotation)}


# --------------------------------------------------------------------------- messages

def problems_of(error: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> list[str]:
    """One line per problem of ``error`` (raised validating ``root``), each naming its key path."""
    lines = []
    for item in error.errors(include_url=False):
        key, target, parent = _walk(root, tuple(item["loc"]), prefix)
        kind = item["type"]
        value = item.get("input")
        if kind == _PROBLEM:
            sub = item["ctx"].get("key")
            lines.append(f"{key}.{sub}: {item['ctx']['message']}" if sub else f"{key}: {item['ctx']['message']}")
        elif kind == "extra_forbidden":
            allowed = ", ".join(parent.model_fields) if _is_model(parent) else ""
            lines.append(f"{key}: unknown key" + (f"; allowed here: {allowed}" if allowed else ""))
        elif kind == "missing":
            lines.append(f"{key}: missing; expected {_expected(target)}")
        elif kind == "union_tag_invalid":
            name = item["ctx"]["discriminator"].strip("'")
            lines.append(f"{key}.{name}: got {value.get(name)!r}, expected one of {item['ctx']['expected_tags']}")
        elif kind == "union_tag_not_found":
            name = item["ctx"]["discriminator"].strip("'")
            choices = ", ".join(tags(target)) if target is not None else ""
            if isinstance(value, dict):
                lines.append(f"{key}: missing `{name}` (one of {choices})")
            else:
                lines.append(f"{key}: got {value!r}, expected a mapping with `{name}` (one of {choices})")
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            lines.append(f"{key}: got {value!r}, expected {_expected(target)}")
        elif kind == "too_short" and get_origin(_strip(target)) is dict:
            lines.append(f"{key}: expected {_expected(target)}, at least {item['ctx']['min_length']}")
        else:
            lines.append(f"{key}: got {value!r}; {item['msg'][:1].lower()}{item['msg'][1:]}")
    return lines


def _strip(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` metadata."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _expected(annotation: Any) -> str:
    if annotation is None:
        return "a value"
    text = _description(annotation) or getattr(annotation, "description", None)
    if text:
        return text
    members = tags(annotation)
    if members:
        name = next(iter(members.values())).model_fields
        key = next(k for k, f in name.items() if get_origin(f.annotation) is Literal)
        return f"a mapping with `{key}` (one of {', '.join(members)})"
    bare = _strip(getattr(annotation, "annotation", annotation))
    if _is_model(bare):
        return "a mapping with keys " + ", ".join(bare.model_fields)
    if get_origin(bare) is dict:
        return "a mapping of named entries"
    return "a value"


def _walk(root: type[BaseModel], loc: tuple, prefix: tuple) -> tuple[str, Any, Any]:
    """(dotted key of ``loc``, the annotation found there, the annotation of its parent).

    A :func:`Tagged` union puts the tag in ``loc``; it is not part of the key.
    """
    parts: list[str] = [str(p) for p in prefix]
    current: Any = root
    parent: Any = None
    index = 0
    while index < len(loc):
        step = loc[index]
        if step == "[key]":  # the key itself is wrong: the key path ends at it
            return ".".join(parts), None, parent
        member = tags(current).get(step) if isinstance(step, str) else None
        if member is not None:  # the tag of a tagged union, not a key
            current = member
            index += 1
            continue
        bare = _strip(current)
        if _is_union(bare) and type(None) in get_args(bare):  # a Nullable: its value's type
            bare = _strip(next(a for a in get_args(bare) if a is not type(None)))
        parent = bare
        if _is_model(bare):
            parts.append(str(step))
            field = bare.model_fields.get(step)
            current = None if field is None else (
                Annotated[(field.annotation, *field.metadata, field)] if field.metadata or field.description
                else field.annotation)
        elif get_origin(bare) is dict:
            parts.append(str(step))
            current = get_args(bare)[1]
        elif get_origin(bare) is list:
            parts[-1] = f"{parts[-1]}[{step}]"
            current = get_args(bare)[0]
        else:
            parts.append(str(step))
            current = None
        index += 1
    return ".".join(parts), current, parent


__all__ = [
    "Bool", "Config", "Float", "Int", "List", "NAME_DOC", "NAME_PATTERN", "Names", "Nullable", "Str",
    "Tagged", "problem", "problems_of", "tags",
]
