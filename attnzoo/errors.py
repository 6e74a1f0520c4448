"""Exceptions and option checks shared by every layer.

Every user-facing check raises ``ValueError`` or ``TypeError`` whose message names
the option, the value received and what would be valid. Helpers here keep that
wording uniform; nothing in attnzoo uses ``assert`` for user input.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

__all__ = [
    "AttnzooError",
    "UnknownVariantError",
    "BackendUnavailableError",
    "NoMatchingModuleError",
    "UnsupportedArchitectureError",
    "suggest",
    "check_positive_int",
    "check_choice",
    "check_type",
]


class AttnzooError(Exception):
    """Base class of attnzoo's own errors."""


class UnknownVariantError(AttnzooError, ValueError):
    """A variant name that is not registered (message lists close matches)."""


class BackendUnavailableError(AttnzooError, RuntimeError):
    """A forced attention backend cannot serve the call (message says why)."""


class NoMatchingModuleError(AttnzooError, ValueError):
    """``patch`` found no attention module to change (message says where it looked)."""


class UnsupportedArchitectureError(AttnzooError, ValueError):
    """A Hugging Face architecture attnzoo has no adapter for (message lists those it has)."""


def suggest(value: str, choices: Iterable[str], n: int = 3) -> str:
    """`` Did you mean 'x' or 'y'?`` for the closest choices, or an empty string."""
    close = difflib.get_close_matches(str(value), list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def check_type(option: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    """Raise ``TypeError`` unless ``value`` is an instance of ``types`` (bools are not ints)."""
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if bad_bool or not isinstance(value, types):
        raise TypeError(f"{option}={value!r} ({type(value).__name__}): expected {what}")


def check_positive_int(option: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    """Raise unless ``value`` is an int >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return
    check_type(option, value, int, f"an integer >= {minimum}" + (" or None" if allow_none else ""))
    if value < minimum:
        raise ValueError(f"{option}={value!r}: expected an integer >= {minimum}")


def check_choice(option: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (lists them, suggests close ones)."""
    choices = list(choices)
    if value not in choices:
        hint = suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ValueError(f"{option}={value!r}: expected one of {', '.join(repr(c) for c in choices)}.{hint}")
