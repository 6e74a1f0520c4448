"""``halve_kv``: an attnzoo plugin variant. A layer keeps its KV heads divided by ``factor`` (default 2).

Everything about the variant is here; attnzoo finds it through the entry point in ``pyproject.toml``
(group ``attnzoo.variants``), which imports this module, which registers the variant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

import attnzoo
from attnzoo.conversion.methods import check_method
from attnzoo.errors import check_positive_int
from attnzoo.options import option
from attnzoo.patches import PatchConfig
from attnzoo.patches.kv_heads import DenseConverter
from attnzoo.variants import DenseAttention, DenseConfig

__all__ = ["HalveKVOptions", "HalveKVConfig", "HalveKV", "HalveKVConverter", "reference"]


@dataclass(frozen=True, kw_only=True)
class HalveKVOptions:
    """The variant's own option, declared once."""

    factor: int = option(2, help="divide the KV heads of every layer by this (it must divide them)")

    def kv_heads_of(self, kv: int, where: str = "") -> int:
        check_positive_int("factor", self.factor)
        if kv % self.factor:
            raise ValueError(f"factor={self.factor}: must divide the {kv} KV heads{' of ' + where if where else ''}; "
                             f"valid factors: {[f for f in range(1, kv + 1) if kv % f == 0]}")
        return kv // self.factor


@dataclass(frozen=True, kw_only=True)
class HalveKVConfig(HalveKVOptions, DenseConfig):
    """The module: dense attention with ``heads // factor`` KV heads (``groups`` is derived, not an option)."""

    def validate(self):
        object.__setattr__(self, "groups", self.kv_heads_of(self.heads, "heads"))
        super().validate()


@dataclass(frozen=True, kw_only=True)
class HalveKV(HalveKVOptions, PatchConfig):
    """``attnzoo.patch(model, HalveKV(factor=2))``, the same as ``attnzoo.patch(model, "halve_kv", factor=2)``."""

    variant: ClassVar[str] = "halve_kv"
    method: str = option("mean", help="how the merged K/V heads are initialised (attnzoo's methods: mean, svd)")

    def validate(self):
        check_positive_int("factor", self.factor)
        check_method(self.method)


class HalveKVConverter(DenseConverter):
    """attnzoo's KV-heads converter (native streaming for the llama family, attnzoo modules elsewhere) with the
    variant's rule for the target."""

    def kv_heads(self, opts, heads, kv, where):
        return HalveKV(factor=opts["factor"], method=opts["method"]).kv_heads_of(kv, where)


def reference(m, x, key_padding_mask=None, **_):
    """float64 reference of the module (bidirectional or causal, no RoPE): per-head loops over its weights."""
    c = m.config
    b, n, _ = x.shape
    hd, g = c.head_dim_, c.heads // c.kv_heads

    def lin(t, layer):
        return t.double() @ layer.weight.double().T + (0 if layer.bias is None else layer.bias.double())

    q = lin(x, m.q_proj).view(b, n, c.heads, hd)
    k = lin(x, m.k_proj).view(b, n, c.kv_heads, hd)
    v = lin(x, m.v_proj).view(b, n, c.kv_heads, hd)
    out = torch.zeros(b, n, c.heads, hd, dtype=torch.float64)
    for bi in range(b):
        for h in range(c.heads):
            s = q[bi, :, h] @ k[bi, :, h // g].T / math.sqrt(hd)
            keep = torch.ones(n, n, dtype=torch.bool)
            if c.causal:
                keep = torch.tril(keep)
            if key_padding_mask is not None:
                keep &= key_padding_mask[bi].bool()[None, :]
            p = torch.nan_to_num(torch.softmax(s.masked_fill(~keep, float("-inf")), -1), nan=0.0)
            out[bi, :, h] = p @ v[bi, :, h // g]
    return lin(out.reshape(b, n, c.heads * hd), m.o_proj)


attnzoo.register("halve_kv", HalveKVConfig, converter=HalveKVConverter(HalveKV), reference=reference,
                 example={"dim": 64, "heads": 4},
                 description="plugin example: every layer keeps its KV heads divided by `factor`")(DenseAttention)
