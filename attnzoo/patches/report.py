"""What ``patch`` changed: :class:`PatchReport`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..conversion.card import kv_change
from ..table import format_table

__all__ = ["PatchReport"]


@dataclass(frozen=True)
class PatchReport:
    """The result of :func:`attnzoo.patch`.

    Attributes:
        variant: the variant patched in (``"gqa"``, ...).
        architecture: the adapter that served the model (``"llama"``, ``"gpt2"``, ...).
        options: the options as applied (groups, method, kernel).
        modules: qualified names of the patched attention modules.
        params_before, params_after: parameter counts of the whole model.
        kv_bytes_per_token_before, kv_bytes_per_token_after: KV-cache bytes per token (batch 1,
            summed over every attention layer, in the model's parameter dtype).
        native: True when the result is a plain ``transformers`` model (``save_pretrained`` then
            ``transformers``' ``from_pretrained`` restores it); False when the checkpoint needs
            :func:`attnzoo.from_pretrained` (the patch is recorded in ``config.json`` under ``attnzoo``).
        notes: anything worth knowing (e.g. why Hugging Face's kernel was kept).
    """

    variant: str
    architecture: str
    options: dict[str, Any]
    modules: list[str]
    params_before: int
    params_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    native: bool
    notes: list[str] = field(default_factory=list)

    @property
    def kv_saving(self) -> float:
        """Fraction of the KV cache saved (0.75 = four times smaller; negative when it grew)."""
        b = self.kv_bytes_per_token_before
        return 0.0 if not b else 1.0 - self.kv_bytes_per_token_after / b

    def rows(self) -> list[dict[str, Any]]:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items() if v is not None)
        return [
            {"": "variant", "value": f"{self.variant} ({opts})"},
            {"": "architecture", "value": self.architecture},
            {"": "patched modules", "value": f"{len(self.modules)}"},
            {"": "parameters", "value": f"{self.params_before:,} -> {self.params_after:,}"},
            {"": "KV cache B/token", "value": f"{self.kv_bytes_per_token_before:,} -> {self.kv_bytes_per_token_after:,}"
                                              f" ({kv_change(self.kv_bytes_per_token_before, self.kv_bytes_per_token_after)})"},
            {"": "checkpoint", "value": "native transformers" if self.native
             else "needs attnzoo.from_pretrained (patch recorded in config.json)"},
        ] + [{"": "note", "value": n} for n in self.notes]

    def __str__(self) -> str:
        return format_table(self.rows(), ["", "value"], title="attnzoo.patch")
