"""Group ``dense``: the MHA/GQA op against every SDPA kernel, the module against a hand-written SDPA module, and
the extra memory of grouped heads.

Shapes follow PEERS.md: bf16, head_dim 128, 16 heads, batch × seq = 16k tokens. Competitors of one case are timed
round-robin over 5 rounds (:func:`attnzoo.bench.measure.measure`); each attnzoo row says how it compares with the
fastest competitor (``vs_best``: its time / attnzoo's; 1.0 = as fast).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import ops

from .measure import Case, Options, measure
from .record import Row
from .timing import flops_attention

TITLE = "MHA/GQA op vs each SDPA kernel (cuDNN, flash, efficient); module vs a hand-written SDPA module; GQA memory"
SECTIONS = {
    "dense-op": "MHA op, N = 2k/8k/16k, causal and not, vs each SDPA kernel",
    "gqa-op": "32 query / 8 KV heads vs SDPA enable_gqa and vs repeating K/V",
    "module": "attnzoo mha/gqa module (projections + RoPE + op) vs a hand-written SDPA module",
    "gqa-memory": "memory the GQA op allocates beyond its inputs (CUDA only)",
}
PEERS = ("ceiling", "dense")  # peers_bench.py groups measured beside this one
EXTRA_COLUMNS = ("vs_best", "spread_pct")

__all__ = ["run", "summary", "TITLE", "SECTIONS", "PEERS", "HandWrittenSDPA"]

SDPA_KERNELS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION"}
ROUNDS = 5


def _rand(*shape, o: Options, grad=True):
    return torch.randn(*shape, device=o.device, dtype=o.dtype, requires_grad=grad)


def _sdpa(kernel: str, q, k, v, causal: bool, gqa: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def _zoo_backend() -> str:
    d = ops.last_decision()
    return d.backend if d is not None else ""


def op_cases(o: Options) -> list[Row]:
    rows: list[Row] = []
    H, D = (4, 64) if o.smoke else (16, 128)
    for n in [256] if o.smoke else [2048, 8192, 16384]:
        b = 1 if o.smoke else max(1, 16384 // n)
        for causal in (False, True):
            tag = f"B{b}H{H}D{D}" + ("-causal" if causal else "")
            cases = []
            for label, kernel in SDPA_KERNELS.items() if o.cuda else ():
                def make(kernel=kernel, causal=causal):
                    q, k, v = (_rand(b, H, n, D, o=o) for _ in range(3))
                    return lambda: _sdpa(kernel, q, k, v, causal, False)
                cases.append(Case(f"{label}:{tag}", make, backend=kernel.lower()))

            def make_zoo(causal=causal):
                q, k, v = (_rand(b, H, n, D, o=o) for _ in range(3))
                return lambda: ops.attention(q, k, v, causal=causal)
            cases.append(Case(f"attnzoo-mha:{tag}", make_zoo, backend=_zoo_backend))
            fl = flops_attention(b, H, n, n, D, causal)
            for c in cases:
                c.flops = fl
            rows += measure(o, "dense-op", n, cases, rounds=ROUNDS)
    return rows


def gqa_cases(o: Options) -> list[Row]:
    """32 query heads over 8 KV heads: SDPA with ``enable_gqa``, SDPA after repeating K/V (the common
    workaround), and attnzoo's op."""
    rows: list[Row] = []
    D = 64 if o.smoke else 128
    hq, hkv = (8, 2) if o.smoke else (32, 8)
    n, b = (256, 1) if o.smoke else (8192, 2)
    g = hq // hkv
    for causal in (False, True):
        tag = f"B{b}Hq{hq}Hkv{hkv}D{D}" + ("-causal" if causal else "")

        def inputs():
            return _rand(b, hq, n, D, o=o), _rand(b, hkv, n, D, o=o), _rand(b, hkv, n, D, o=o)
        cases = []
        for label, kernel in SDPA_KERNELS.items() if o.cuda else ():
            def make(kernel=kernel, causal=causal):
                q, k, v = inputs()
                return lambda: _sdpa(kernel, q, k, v, causal, True)

            def make_rep(kernel=kernel, causal=causal):
                q, k, v = inputs()
                return lambda: _sdpa(kernel, q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), causal, False)
            cases.append(Case(f"{label}:{tag}", make, backend=kernel.lower() + "+enable_gqa"))
            cases.append(Case(f"{label}-repeat-kv:{tag}", make_rep, backend=kernel.lower() + "+repeat_kv"))

        def make_zoo(causal=causal):
            q, k, v = inputs()
            return lambda: ops.attention(q, k, v, causal=causal)
        cases.append(Case(f"attnzoo-gqa:{tag}", make_zoo, backend=_zoo_backend))
        fl = flops_attention(b, hq, n, n, D, causal)
        for c in cases:
            c.flops = fl
        rows += measure(o, "gqa-op", n, cases, rounds=ROUNDS)
    return rows


class HandWrittenSDPA(torch.nn.Module):
    """What people write by hand: four Linears, HF-style rotate-half RoPE, F.scaled_dot_product_attention."""

    def __init__(self, dim, heads, kv_heads, head_dim):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, head_dim
        self.q_proj = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = torch.nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * head_dim, dim, bias=False)
        self.register_buffer("inv_freq", ops.inv_frequencies(head_dim), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.hkv, self.d).transpose(1, 2)
        freqs = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        def rot(t):
            t1, t2 = t.chunk(2, -1)
            return t * cos + torch.cat((-t2, t1), -1) * sin
        o = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True, enable_gqa=self.h != self.hkv)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, self.h * self.d))


def module_cases(o: Options) -> list[Row]:
    rows: list[Row] = []
    dim, heads, hd = (256, 4, 64) if o.smoke else (2048, 16, 128)
    n, b = (256, 1) if o.smoke else (8192, 2)
    for groups in (heads, heads // 4):
        name = "mha" if groups == heads else "gqa"
        tag = f"dim{dim}H{heads}KV{groups}N{n}B{b}-causal-rope"
        proj_fl = 2 * b * n * dim * hd * (2 * heads + 2 * groups)
        fl = flops_attention(b, heads, n, n, hd, True) + proj_fl

        def make_zoo(groups=groups, name=name):
            opts = dict(dim=dim, heads=heads, head_dim=hd, causal=True, rope=True)
            if name == "gqa":
                opts["groups"] = groups
            m = attnzoo.create(name, **opts).to(o.device, o.dtype)
            x = _rand(b, n, dim, o=o)
            return lambda: m(x)

        def make_hand(groups=groups):
            m = HandWrittenSDPA(dim, heads, groups, hd).to(o.device, o.dtype)
            x = _rand(b, n, dim, o=o)
            return lambda: m(x)
        rows += measure(o, "module", n, [Case(f"attnzoo-{name}:{tag}", make_zoo, fl, "module"),
                                         Case(f"hand-written-sdpa:{tag}", make_hand, fl, "sdpa-default")],
                        rounds=ROUNDS)
    return rows


def gqa_memory_cases(o: Options) -> list[Row]:
    """Extra memory the op allocates beyond its inputs and output, for 32 query heads over 8 KV heads."""
    rows: list[Row] = []
    if not o.cuda:
        return rows
    hq, hkv, D, n, b = 32, 8, 128, (256 if o.smoke else 8192), 2
    for causal in (False, True):
        q = torch.randn(b, hq, n, D, device=o.device, dtype=o.dtype)
        k, v = (torch.randn(b, hkv, n, D, device=o.device, dtype=o.dtype) for _ in range(2))
        kv_mb = 2 * k.numel() * k.element_size() / 2**20
        out_mb = q.numel() * q.element_size() / 2**20
        ops.attention(q, k, v, causal=causal)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            ops.attention(q, k, v, causal=causal)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(Row("gqa-memory", f"attnzoo-gqa:B{b}Hq{hq}Hkv{hkv}D{D}" + ("-causal" if causal else ""), n,
                        "fwd", float("nan"), None, round(extra, 1), _zoo_backend(),
                        f"K/V hold {kv_mb:.0f} MiB; output {out_mb:.0f} MiB; repeating K/V would add "
                        f"{kv_mb * (hq // hkv - 1):.0f} MiB", {"extra_mb": round(extra, 1), "kv_mb": round(kv_mb, 1),
                                                                "out_mb": round(out_mb, 1)}))
        o.log(f"gqa-memory {rows[-1].name}: {rows[-1].note}; extra {extra:.1f} MiB")
        del q, k, v
    return rows


def run(o: Options) -> list[Row]:
    rows: list[Row] = []
    for section, fn in (("dense-op", op_cases), ("gqa-op", gqa_cases), ("module", module_cases),
                        ("gqa-memory", gqa_memory_cases)):
        if o.wants(section):
            o.log(f"== dense: {section}")
            rows += fn(o)
    annotate_ratios(rows)
    return rows


def annotate_ratios(rows: list[Row]) -> None:
    """For each attnzoo row: its speed relative to the fastest competitor of the same case (``vs_best`` = best
    competitor ms / attnzoo ms; 1.0 = as fast; the issue's bar is 0.95). Repeating K/V is not a competitor."""
    best: dict = {}
    for r in rows:
        if ":" in r.name and not r.name.startswith("attnzoo") and "repeat" not in r.name and r.ok:
            key = (r.group, r.name.split(":", 1)[1], r.mode)
            if key not in best or r.ms < best[key][1]:
                best[key] = (r.name.split(":", 1)[0], r.ms)
    for r in rows:
        key = (r.group, r.name.split(":", 1)[-1], r.mode)
        if r.name.startswith("attnzoo") and key in best and r.ok:
            other, ms = best[key]
            r.extra["vs_best"] = round(ms / r.ms, 3)
            r.note = f"{ms / r.ms:.3f} of {other}" + (f"; {r.note}" if r.note else "")


def summary(rows: list[Row], peers: list[Row], out_dir: str | None = None, stem: str = "") -> list[str]:
    """The attnzoo rows against the fastest competitor of their case, and the worst ratio."""
    from ..table import markdown_table

    ours = [r for r in rows if "vs_best" in r.extra]
    if not ours:
        return []
    worst = min(ours, key=lambda r: r.extra["vs_best"])
    table = [{"section": r.group, "name": r.name, "mode": r.mode, "n": r.n, "ms": r.ms, "gpu_ms": r.gpu_ms,
              "vs best": r.extra["vs_best"], "note": r.note} for r in ours]
    return ["## attnzoo against the fastest competitor", "",
            f"Lowest ratio: {worst.extra['vs_best']:.3f} ({worst.name}, {worst.mode}); 1.0 = as fast as the best "
            "SDPA kernel, the bar is 0.95.", "", markdown_table(table)]
