"""Names -> (config class, module class): the zoo's one registry.

Built-in variants register themselves when :mod:`attnzoo.variants` is imported.
Third-party packages add theirs through the entry-point group
``attnzoo.variants``: each entry point names a module (or a callable) that, when
loaded, calls :func:`register`. Entry points are loaded once, the first time the
registry is asked for a name it does not hold or for the full list.

Example::

    @attnzoo.register("my_attn", config_cls=MyConfig, example={"dim": 64, "heads": 4})
    class MyAttention(torch.nn.Module):
        def __init__(self, config: MyConfig): ...
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UnknownVariantError, check_type, suggest

__all__ = ["VariantEntry", "register", "get", "create", "list_variants", "ENTRY_POINT_GROUP"]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "attnzoo.variants"


@dataclass(frozen=True)
class VariantEntry:
    """One registered variant.

    ``example`` holds small valid options (used by ``attnzoo list``, the docs and the
    registry-parametrized tests); ``description`` is the one line ``attnzoo list`` shows.
    """

    name: str
    config_cls: type
    module_cls: type
    example: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def make_config(self, **options: Any):
        return self.config_cls.from_options(self.name, **options)


_REGISTRY: dict[str, VariantEntry] = {}
_entry_points_loaded = False


def register(name: str, config_cls: type, *, example: dict[str, Any] | None = None,
             description: str = "") -> Callable[[type], type]:
    """Class decorator: register ``module_cls`` under ``name`` with its config class.

    Raises ``ValueError`` when ``name`` is taken (names are global; pick a prefix for
    plugins) and ``TypeError`` when ``config_cls`` lacks ``from_options``.
    """
    check_type("name", name, str, "a variant name (str)")
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"name={name!r}: expected lower-case letters, digits and underscores")
    if not hasattr(config_cls, "from_options"):
        raise TypeError(f"config_cls={config_cls!r}: expected a subclass of attnzoo.variants.VariantConfig")

    def deco(module_cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"variant {name!r} is already registered (by {_REGISTRY[name].module_cls.__module__}."
                             f"{_REGISTRY[name].module_cls.__qualname__}); choose another name")
        _REGISTRY[name] = VariantEntry(name, config_cls, module_cls, dict(example or {}),
                                       description or (module_cls.__doc__ or "").strip().split("\n")[0])
        return module_cls

    return deco


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as e:  # a broken plugin must not break the built-in zoo
            log.warning("attnzoo: could not load variant plugin %r (%s): %s", ep.name, ep.value, e)


def _builtin() -> None:
    from . import variants  # noqa: F401  (registers the built-in zoo)


def get(name: str) -> VariantEntry:
    """The entry for ``name``; ``UnknownVariantError`` with close matches otherwise."""
    check_type("name", name, str, "a variant name (str)")
    _builtin()
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        names = sorted(_REGISTRY)
        raise UnknownVariantError(f"unknown variant {name!r}.{suggest(name, names)} "
                                  f"Registered variants: {', '.join(names)}")
    return _REGISTRY[name]


def list_variants(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the shell-style ``pattern`` (e.g. ``"*qa"``)."""
    _builtin()
    _load_entry_points()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def create(name: str, **options: Any):
    """Build the module registered as ``name`` from keyword ``options``.

    ``attnzoo.create("gqa", dim=512, heads=8, groups=2)``. Unknown or invalid options
    raise ``ValueError``/``TypeError`` naming the option, the value and what is valid.
    """
    entry = get(name)
    return entry.module_cls(entry.make_config(**options))
