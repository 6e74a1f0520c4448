"""Finding the attention modules of a model (one :class:`Site` each) and reading/writing
their projections as :class:`~attnzoo.conversion.heads.AttnWeights`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..conversion.heads import AttnWeights, RopeSpec
from ..conversion.layouts import merge_concat, split_concat, split_conv1d, split_interleaved
from ..kv import KVLayout
from .adapters import Adapter, Tower, rope_spec_of

__all__ = ["Site", "find_sites", "get_submodule", "set_linear"]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _first_attr(obj, names, default=None):
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return default


@dataclass
class Site:
    """One attention module of a model, as the adapter sees it."""

    adapter: Adapter
    root: nn.Module
    fqn: str
    tower: Tower
    layer: int

    # ------------------------------------------------------------------ where things are
    @property
    def module(self) -> nn.Module:
        return get_submodule(self.root, self.fqn)

    @property
    def parent_path(self) -> str:
        return self.fqn.rpartition(".")[0]

    @property
    def attr(self) -> str:
        return self.fqn.rpartition(".")[2]

    @property
    def config(self):
        return getattr(self.module, "hf_config", None) or getattr(self.module, "config", None) or self.root.config

    @property
    def swapped(self) -> bool:
        """The HF module was replaced by attnzoo's (``DenseAttention`` with ``q_proj``...``o_proj``)."""
        from ..variants.dense import DenseAttention

        return isinstance(self.module, DenseAttention)

    def o_path(self) -> str:
        """Qualified name of the output projection (inside the module or a sibling)."""
        o = self.adapter.o
        if self.swapped and not self.adapter.o_outside:
            return f"{self.fqn}.o_proj"
        if o.startswith("../"):
            return f"{self.parent_path}.{o[3:]}" if self.parent_path else o[3:]
        return f"{self.fqn}.{o}"

    # ------------------------------------------------------------------ shapes
    @property
    def heads(self) -> int:
        m = self.module
        return int(_first_attr(m, ("heads", "num_heads", "num_attention_heads"),
                               getattr(self.config, "num_attention_heads", None)))

    @property
    def head_dim(self) -> int:
        m = self.module
        hd = _first_attr(m, ("head_dim", "head_size", "attention_head_size"))
        if hd is None:
            c = self.config
            hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return int(hd)

    @property
    def kv_heads(self) -> int:
        m = self.module
        if hasattr(m, "kv_heads") and isinstance(m.kv_heads, int):
            return m.kv_heads  # attnzoo module
        a = self.adapter
        if a.layout == "separate":
            return getattr(m, a.k).weight.shape[0] // self.head_dim
        if a.layout == "concat":
            rows = getattr(m, a.qkv).weight.shape[0]
            return (rows - self.heads * self.head_dim) // (2 * self.head_dim)
        return self.heads  # interleaved / conv1d layouts are always MHA

    @property
    def causal(self) -> bool:
        if self.tower.causal is not None:
            return self.tower.causal
        return bool(getattr(self.module, "is_causal", False))

    def kv_layout(self) -> KVLayout:
        """What this layer caches per token as the model stands (an attnzoo module says it; a Hugging Face
        module caches keys and values of its KV heads). Windows are left to the config (see
        :mod:`attnzoo.record`), except a recurrent layer's (linear attention keeps its window in its own state
        cache, not in transformers' sliding-window cache)."""
        config = getattr(self.module, "config", None)
        if hasattr(config, "kv_layout"):
            lay = config.kv_layout()
            return lay if lay.state else lay.with_window(None)  # a recurrent layer's window is its own cache's
        return KVLayout(kv_heads=self.kv_heads, head_dim=self.head_dim)

    def rope(self) -> RopeSpec:
        return rope_spec_of(self.adapter, self.config, self.head_dim)

    # ------------------------------------------------------------------ weights
    def read(self) -> AttnWeights:
        """The module's projections (views of the live parameters, not copies)."""
        a, m = self.adapter, self.module
        heads, hd = self.heads, self.head_dim
        if self.swapped:
            q, k, v = m.q_proj.weight, m.k_proj.weight, m.v_proj.weight
            qb, kb, vb = m.q_proj.bias, m.k_proj.bias, m.v_proj.bias
        elif a.layout == "separate":
            lq, lk, lv = getattr(m, a.q), getattr(m, a.k), getattr(m, a.v)
            q, k, v = lq.weight, lk.weight, lv.weight
            qb, kb, vb = lq.bias, lk.bias, lv.bias
        elif a.layout == "concat":
            fused = getattr(m, a.qkv)
            q, k, v = split_concat(fused.weight, heads, self.kv_heads, hd)
            qb, kb, vb = split_concat(fused.bias, heads, self.kv_heads, hd)
        elif a.layout == "interleaved":
            fused = getattr(m, a.qkv)
            q, k, v = split_interleaved(fused.weight, heads, hd)
            qb, kb, vb = split_interleaved(fused.bias, heads, hd)
        elif a.layout == "conv1d":
            fused = getattr(m, a.qkv)
            (q, k, v), (qb, kb, vb) = split_conv1d(fused.weight, fused.bias, heads * hd)
        else:
            raise ValueError(f"adapter {a.name!r}: unknown layout {a.layout!r}")
        o_mod = get_submodule(self.root, self.o_path())
        o = o_mod.weight.t() if a.layout == "conv1d" and not self.swapped else o_mod.weight
        return AttnWeights(q=q.detach(), k=k.detach(), v=v.detach(), o=o.detach(), heads=heads, head_dim=hd,
                           q_bias=None if qb is None else qb.detach(), k_bias=None if kb is None else kb.detach(),
                           v_bias=None if vb is None else vb.detach())

    def o_bias(self) -> torch.Tensor | None:
        b = get_submodule(self.root, self.o_path()).bias
        return None if b is None else b.detach()

    def write_native(self, w: AttnWeights) -> None:
        """Write ``w`` back into the HF module itself (native layouts), resizing k/v as needed and
        updating the module's head-count attributes."""
        a, m = self.adapter, self.module
        if a.layout == "separate":
            set_linear(m, a.q, w.q, w.q_bias)
            set_linear(m, a.k, w.k, w.k_bias)
            set_linear(m, a.v, w.v, w.v_bias)
        elif a.layout == "concat":
            set_linear(m, a.qkv, merge_concat(w.q, w.k, w.v), merge_concat(w.q_bias, w.k_bias, w.v_bias))
        else:
            raise ValueError(f"adapter {a.name!r} ({a.layout}) has no native KV-head layout")
        set_kv_attributes(m, w.heads, w.kv_heads)
        if w.o is not None:
            o_mod = get_submodule(self.root, self.o_path())
            with torch.no_grad():
                o_mod.weight.copy_(w.o)

    def resize_native(self, kv_heads: int) -> None:
        """Give the HF module ``kv_heads`` KV heads without computing weights (reload path)."""
        a, m, hd = self.adapter, self.module, self.head_dim
        if a.layout == "separate":
            for name in (a.k, a.v):
                old = getattr(m, name)
                setattr(m, name, _like(old, old.in_features, kv_heads * hd))
        elif a.layout == "concat":
            old = getattr(m, a.qkv)
            setattr(m, a.qkv, _like(old, old.in_features, (self.heads + 2 * kv_heads) * hd))
        set_kv_attributes(m, self.heads, kv_heads)


def set_kv_attributes(module: nn.Module, heads: int, kv_heads: int) -> None:
    """The attributes HF attention modules read at run time (``num_key_value_groups``, ...)."""
    if hasattr(module, "num_key_value_groups"):
        module.num_key_value_groups = heads // kv_heads
    if hasattr(module, "num_key_value_heads"):
        module.num_key_value_heads = kv_heads


def _like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def set_linear(parent: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Put ``weight``/``bias`` into ``parent.<name>`` (an ``nn.Linear``), in place when the shape is
    unchanged (ties and hooks survive), else as a new ``nn.Linear`` of the same dtype/device."""
    old = getattr(parent, name)
    if tuple(old.weight.shape) != tuple(weight.shape):
        new = _like(old, weight.shape[1], weight.shape[0])
        setattr(parent, name, new)
        old = new
    with torch.no_grad():
        old.weight.copy_(weight)
        if bias is not None:
            old.bias.copy_(bias)


def find_sites(model: nn.Module, adapter: Adapter) -> list[Site]:
    """Every attention module the adapter knows in ``model``, in module order."""
    sites = []
    for fqn, _ in model.named_modules():
        hit = adapter.tower_of(fqn) if fqn else None
        if hit is not None:
            sites.append(Site(adapter, model, fqn, hit[0], hit[1]))
    return sites
