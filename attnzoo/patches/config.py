"""Typed patch configs, torchao-style: ``attnzoo.patch(model, attnzoo.GQA(groups=8))`` is
``attnzoo.patch(model, "gqa", groups=8)``; both build the same config and run the same code.

A patch config is a frozen, keyword-only dataclass whose fields are declared with
:func:`attnzoo.options.option` (default, help, CLI parsing): the fields are the options of ``patch`` and the
flags of ``attnzoo convert``, and the config's :meth:`to_dict` is what ``config.json`` records. The variant's
own options come from the same declarations as its module config (a mixin such as
:class:`~attnzoo.variants.sparse.SlidingWindowOptions`), so no option or default is written twice.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import suggest
from ..options import option_specs

__all__ = ["PatchConfig"]


@dataclass(frozen=True, kw_only=True)
class PatchConfig:
    """Base of the typed patch configs. ``variant`` names the registered variant the config converts to."""

    variant: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks that need no model (``ValueError``/``TypeError`` naming the option, the value, what is valid);
        the converter checks the rest against the model's shapes."""

    @classmethod
    def option_names(cls) -> list[str]:
        return [s.name for s in option_specs(cls)]

    @classmethod
    def from_options(cls, **options: Any) -> PatchConfig:
        """Build from keyword options; an unknown option raises with close matches and the valid ones."""
        names = cls.option_names()
        for key in options:
            if key not in names:
                raise ValueError(f"unknown option {key!r} for patch(model, {cls.variant!r}).{suggest(key, names)} "
                                 f"Valid options: {', '.join(names + ['layers', 'filter_fn'])}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """The options as recorded (JSON-able: tuples become lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}
