"""Shared entry-point behaviour of the stage scripts."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from chestssl.errors import UserError
from chestssl.params import ParamsError

# Errors the user can act on; their message is the whole story, so no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def run_stage(main: Callable[[list[str]], None], argv: list[str] | None = None, preload: bool = True) -> None:
    """Run a stage's ``main`` and turn user errors into a one-message exit status 1.

    Under ``python -m chestssl.preload run`` (``make reproduce``), a server that has already
    imported torch and MONAI runs the stage script instead and this process relays its exit
    status (:func:`chestssl.preload.run_in_server`, which returns here when it cannot).
    ``preload=False``: a stage that never imports torch runs here (a fork of the server would
    gain nothing and share its pages).
    """
    if argv is None and preload:
        from chestssl.preload import run_in_server

        run_in_server()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        main(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def name_from_argv(argv: list[str], names, key: str) -> str:
    """The stage's single argument, which must be one of ``names`` (listed under the params ``key``)."""
    if len(argv) != 1 or argv[0] not in names:
        got = " ".join(argv) or "nothing"
        raise ParamsError([f"{key}: got {got!r} on the command line, expected one of {', '.join(names)}"])
    return argv[0]


def entry_from_argv(argv: list[str], params: dict, section: str) -> tuple[str, dict]:
    """The ``methods``/``runs`` entry named by the stage's single argument."""
    name = name_from_argv(argv, params[section], section)
    return name, params[section][name]
