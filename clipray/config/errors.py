"""The one error type a user sees as a single line (``clipray: error: ...``, exit status 2), and
the bounded pieces of user values such a line may quote."""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from typing import Any

MAX_QUOTE = 100  # characters of a user value an error message may quote


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line naming the file or field."""


class StoppedError(RuntimeError):
    """A run stopped by its surroundings (storage full or read-only), not by bad input: one line
    saying what happened and how to continue, exit status 1."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 3
_REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxarray = 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def brief(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)``, bounded in size whatever the value (an alias-bomb list, a megabyte
    string): never more than ``limit`` characters, and never walks more than a few items."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief_text(text: str, limit: int = MAX_QUOTE) -> str:
    """``text`` itself (no quotes added), cut to ``limit`` characters, on one line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief_list(items: Iterable[Any], limit: int = 8) -> str:
    """``a, b, c, ... (N in all)``: the first ``limit`` items of a list of known names."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])}, ... ({len(items)} in all)"
