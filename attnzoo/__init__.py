"""attnzoo: attention model surgery for PyTorch and Hugging Face models.

Public API (see docs/ and DESIGN): :func:`list_variants`, :func:`create`, :func:`register`,
:func:`kv_cache_bytes`, :func:`patch` (with :class:`PatchReport`), :func:`from_pretrained`,
:func:`plot_pattern`, the typed patch configs of the registered variants (``attnzoo.GQA``, ``attnzoo.MQA``,
``attnzoo.MHA``, ``attnzoo.SlidingWindow``, ``attnzoo.Longformer``, ``attnzoo.BigBird`` and a plugin's own,
found through the registry by class name) and the functional ops in :mod:`attnzoo.ops`.

The names load on first use (PEP 562), so ``import attnzoo`` and the ``attnzoo`` command's start-up
import no torch: the command sets ``OMP_WAIT_POLICY`` (see :mod:`attnzoo.cli`) before torch loads
OpenMP. ``from attnzoo import patch`` and ``attnzoo.patch`` work as with eager imports.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import (AttnzooError, BackendUnavailableError, NoMatchingModuleError, UnknownVariantError,
                     UnsupportedArchitectureError)

__version__ = "0.1.0"

# public name -> (module, attribute in it; None: the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "ops": (".ops", None),
    "create": (".registry", "create"),
    "list_variants": (".registry", "list_variants"),
    "register": (".registry", "register"),
    "kv_cache_bytes": (".kv", "kv_cache_bytes"),
    "patch": (".patches", "patch"),
    "PatchReport": (".patches", "PatchReport"),
    "PatchConfig": (".patches", "PatchConfig"),
    "from_pretrained": (".patches", "from_pretrained"),
    "plot_pattern": (".plot", "plot_pattern"),
    "plot_zoo": (".plot", "plot_zoo"),
}

__all__ = ["__version__", "ops", "create", "list_variants", "register", "kv_cache_bytes", "patch", "PatchReport",
           "PatchConfig",
           "from_pretrained", "plot_pattern", "plot_zoo", "AttnzooError",
           "BackendUnavailableError", "NoMatchingModuleError", "UnknownVariantError", "UnsupportedArchitectureError"]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from . import ops
    from .kv import kv_cache_bytes
    from .patches import PatchConfig, PatchReport, from_pretrained, patch
    from .plot import plot_pattern, plot_zoo
    from .registry import create, list_variants, register


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        typed = _typed_config(name)
        if typed is not None:
            return typed
        if importlib.util.find_spec(f"{__name__}.{name}") is None:  # attnzoo.registry, attnzoo.kv, ... load too
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        module, attr = f".{name}", None
    mod = importlib.import_module(module, __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def _typed_config(name: str):
    """``attnzoo.GQA``, ``attnzoo.SlidingWindow``, ...: the typed patch config of a registered variant (built-in
    or plugin) whose class has this name; read from the registry, so a new variant needs no line here."""
    if not name[:1].isupper():
        return None
    from .patches.converters import converters

    for conv in converters().values():
        if conv.config_cls.__name__ == name:
            return conv.config_cls
    return None


def __dir__() -> list[str]:
    from .patches.converters import converters

    return sorted(set(globals()) | set(__all__) | {c.config_cls.__name__ for c in converters().values()})
