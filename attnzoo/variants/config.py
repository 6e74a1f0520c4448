"""Config base class shared by every variant: frozen, validated, built from keyword options."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import check_choice, check_positive_int, check_type, suggest
from ..ops.rope import STYLES

__all__ = ["VariantConfig", "RopeConfig", "jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: tuples become lists, configs dicts; anything else unknown its ``repr``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


@dataclass(frozen=True)
class VariantConfig:
    """Base of every variant's config. Subclasses are frozen dataclasses that check
    themselves in :meth:`validate` (called on construction)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the option, the value and what is valid."""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_options(cls, variant: str = "", **options: Any):
        """Build from keyword options; an unknown option raises with close matches."""
        names = cls.option_names()
        for key in options:
            if key not in names:
                raise ValueError(f"unknown option {key!r} for variant {variant or cls.__name__!r}."
                                 f"{suggest(key, names)} Valid options: {', '.join(names)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in options and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"variant {variant or cls.__name__!r} needs option(s) {', '.join(missing)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (nested configs become dicts) that :meth:`from_options` accepts."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RopeConfig(VariantConfig):
    """Rotary embedding settings.

    ``rotary_dim``: dims rotated per head (None: the whole head; must be even),
    ``base``: frequency base (theta), ``style``: ``"half"`` or ``"interleaved"``
    (see :mod:`attnzoo.ops.rope`).
    """

    rotary_dim: int | None = None
    base: float = 10000.0
    style: str = "half"

    def validate(self):
        check_positive_int("rope.rotary_dim", self.rotary_dim, allow_none=True, minimum=2)
        if self.rotary_dim is not None and self.rotary_dim % 2:
            raise ValueError(f"rope.rotary_dim={self.rotary_dim}: expected an even number")
        check_type("rope.base", self.base, (int, float), "a positive number")
        if self.base <= 0:
            raise ValueError(f"rope.base={self.base!r}: expected a positive number")
        check_choice("rope.style", self.style, STYLES)

    @staticmethod
    def coerce(value: Any) -> "RopeConfig | None":
        """``False``/None -> None, ``True`` -> defaults, a dict -> RopeConfig(**dict)."""
        if value is None or value is False:
            return None
        if value is True:
            return RopeConfig()
        if isinstance(value, RopeConfig):
            return value
        if isinstance(value, dict):
            return RopeConfig.from_options("rope", **value)
        raise TypeError(f"rope={value!r}: expected True/False, a dict of rope options or a RopeConfig")
