"""Argument checks shared by model and method constructors.

Params are validated when a stage starts (:mod:`chestssl.params`); these checks only keep
a constructor from building nonsense, with messages that name its own argument.
"""

from __future__ import annotations

import numbers
from typing import Any
from urllib.parse import urlsplit


def positive_int(value: Any, key: str, allowed: str = "a positive integer") -> int:
    """``value`` as an int if it is an integer >= 1 (not a bool); else a ValueError naming ``key``, the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{key}: got {value!r}, expected {allowed}")
    return int(value)


def is_http_url(value: Any) -> bool:
    """Whether ``value`` is an http(s) URL with a host and no whitespace."""
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    parts = urlsplit(value)
    try:
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host)
