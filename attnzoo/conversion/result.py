"""What ``attnzoo convert`` did: :class:`ConversionResult`, one type for every method."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kv import KVLayout, element_size

__all__ = ["ConversionResult"]


@dataclass
class ConversionResult:
    """A checkpoint conversion (or its plan, with ``dry_run``).

    ``summary`` is one line saying what was done; ``rewritten`` what was rewritten; ``layouts_before`` and
    ``layouts_after`` what each attention layer caches (:class:`~attnzoo.kv.KVLayout`), from which every KV
    figure is computed; ``exact``: nothing was approximated (the converted model computes what the source
    did); ``plan``: rows of tensors rewritten, grouped (``tensors``, ``count``, ``shape before``,
    ``shape after``, ``dtype``).
    """

    src: Path
    dst: Path
    variant: str
    options: dict[str, Any]
    native: bool
    streamed: bool
    dtype: str
    summary: str
    layouts_before: list[KVLayout]
    layouts_after: list[KVLayout]
    bytes_before: int
    dry_run: bool
    exact: bool = False
    bytes_after: int = 0
    rewritten: str = ""
    seconds: float = 0.0
    model_type: str = "?"
    model_class: str = "AutoModel"
    native_field: str = ""
    lossy_note: str = ""
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)

    def per_token(self, after: bool = True) -> int:
        """KV-cache bytes per token (batch 1, every layer, no window full) in the output dtype."""
        layouts = self.layouts_after if after else self.layouts_before
        return sum(lay.per_token for lay in layouts) * element_size(self.dtype)

    def kv_change(self) -> str:
        """``"75.0% saved"``, ``"no change"`` or ``"4.0x larger, +300.0%"``, per token."""
        from .card import kv_change

        return kv_change(self.per_token(False), self.per_token(True))
