"""The zoo's one registry: one entry per variant name, holding everything about it.

An entry (:class:`VariantEntry`) holds the variant's typed module config (whose fields, declared with
:func:`attnzoo.options.option`, give its options, defaults and docs, and whose ``kv_layout()`` says what a
layer caches: :class:`attnzoo.kv.KVLayout`), its module, its converter (how ``attnzoo.patch`` and
``attnzoo convert`` put it into a Hugging Face model, with the converter's typed patch config; None when it
has none), an example of small valid options, a one-line description and, optionally, a float64 reference
``reference(module, x, key_padding_mask=...)`` that the registry-parametrized tests compare the module with.

Built-in variants register themselves when :mod:`attnzoo.variants` is imported.
Third-party packages add theirs through the entry-point group
``attnzoo.variants``: each entry point names a module (or a callable) that, when
loaded, calls :func:`register`. Entry points are loaded once, the first time the
registry is asked for a name it does not hold or for the full list.

``converter`` and ``reference`` may be given as ``"package.module:attribute"`` strings, imported on first
use (attnzoo's own entries do so: the variants sit below the patches in the layers).

Example (a whole plugin: ``examples/plugin``)::

    @attnzoo.register("my_attn", config_cls=MyConfig, converter=MyConverter(), example={"dim": 64, "heads": 4})
    class MyAttention(torch.nn.Module):
        def __init__(self, config: MyConfig): ...
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UnknownVariantError, check_type, suggest

__all__ = ["VariantEntry", "register", "get", "entries", "create", "list_variants", "ENTRY_POINT_GROUP"]

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
    converter_ref: Any = None
    reference_ref: Any = None

    def make_config(self, **options: Any):
        return self.config_cls.from_options(self.name, **options)

    @property
    def converter(self):
        """The converter (``attnzoo.patches.converters.Converter``), or None: ``patch`` cannot put this variant
        into a Hugging Face model."""
        return _resolve(self.converter_ref, f"converter of {self.name!r}")

    @property
    def reference(self) -> Callable | None:
        """The float64 reference of the module, or None."""
        return _resolve(self.reference_ref, f"reference of {self.name!r}")


def _resolve(ref, what: str):
    if not isinstance(ref, str):
        return ref
    import importlib

    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"{what}: cannot import {ref!r} ({e})") from e


_REGISTRY: dict[str, VariantEntry] = {}
_entry_points_loaded = False


def register(name: str, config_cls: type, *, converter: Any = None, reference: Any = None,
             example: dict[str, Any] | None = None, description: str = "") -> Callable[[type], type]:
    """Class decorator: register ``module_cls`` under ``name`` with its config class, its converter and its
    float64 reference (both optional; objects or ``"module:attribute"`` strings).

    Raises ``ValueError`` when ``name`` is taken (names are global; pick a prefix for
    plugins) and ``TypeError`` when ``config_cls`` lacks ``from_options`` or ``kv_layout``.
    """
    check_type("name", name, str, "a variant name (str)")
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"name={name!r}: expected lower-case letters, digits and underscores")
    if not hasattr(config_cls, "from_options") or not hasattr(config_cls, "kv_layout"):
        raise TypeError(f"config_cls={config_cls!r}: expected a subclass of attnzoo.variants.VariantConfig with a "
                        "kv_layout() method (what a layer caches: attnzoo.kv.KVLayout)")

    def deco(module_cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"variant {name!r} is already registered (by {_REGISTRY[name].module_cls.__module__}."
                             f"{_REGISTRY[name].module_cls.__qualname__}); choose another name")
        _REGISTRY[name] = VariantEntry(name, config_cls, module_cls, dict(example or {}),
                                       description or (module_cls.__doc__ or "").strip().split("\n")[0],
                                       converter, reference)
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


def entries() -> list[VariantEntry]:
    """Every entry (built-in and plugins), sorted by name."""
    _builtin()
    _load_entry_points()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


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
