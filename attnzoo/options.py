"""Typed options: dataclass fields that carry their own help, so that one declaration gives the default, the
validation message, the CLI flag (``attnzoo convert``), the record in ``config.json``, ``attnzoo list --json``
and the docs.

Declare an option with :func:`option` in a frozen dataclass; read the declarations back with
:func:`option_specs`::

    @dataclass(frozen=True, kw_only=True)
    class SlidingWindowOptions:
        window: int = option(256, help="keys on each side of a query, its own not counted")
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable

__all__ = ["option", "OptionSpec", "option_specs", "REQUIRED"]

REQUIRED = MISSING  # option(REQUIRED, help=...): no default


def option(default: Any = MISSING, *, help: str, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None) -> Any:
    """A dataclass field with its ``help`` (one sentence, lower case), and for the CLI a ``parse`` function of
    the flag's text (default: from the annotation) and a ``metavar``."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


@dataclass(frozen=True)
class OptionSpec:
    """One declared option: ``name``, ``type`` (the annotation's text), ``default`` (MISSING: required),
    ``help``, ``parse``, ``metavar``."""

    name: str
    type: str
    default: Any
    help: str
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def as_json(self) -> dict[str, Any]:
        """``{name, type, default, required, doc}`` (no default when required), for ``attnzoo list --json``."""
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if not self.required:
            out["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        return {**out, "required": self.required, "doc": self.help}


def option_specs(cls) -> list[OptionSpec]:
    """The options a dataclass declares with :func:`option` (fields without help are not options)."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        out.append(OptionSpec(f.name, str(f.type), default, f.metadata["help"], f.metadata.get("parse"),
                              f.metadata.get("metavar")))
    return out
