"""Group ``sparse``: attnzoo's sparse attention against FlexAttention with a plain ``mask_mod`` and dense cuDNN.

Shapes follow the peers (``peers_bench.py``): hidden 768, 12 heads (head_dim 64), batch 1, bf16. "(+qkv)" rows
include the q/k/v projection (one Linear 768 -> 2304, viewed and permuted to q, k, v, as the peers do);
"attention alone" rows take leaf q, k, v; "kernels, dO given" rows run ``torch.autograd.grad(out, (q, k, v), dO)``
with a fixed dO: the attention's forward and backward kernels with no loss (how attention kernels are compared, and
what the ">= 1.5x faster than FlexAttention" target is judged on, see docs/sparse.md "Benchmark"). "±256" is
``window=256``, the peers' ``W=512`` / ``(qi - ki).abs() <= 256``.

Sections:

* ``sliding``: N=16384, ±256: the op (what dispatch picks; on CUDA also forced ``triton`` and ``flex``),
  ``longformer`` (±256 + 1 global token), the ``sliding_window`` module, FlexAttention with a plain ``mask_mod``,
  the op and that FlexAttention on the attention alone and given dO, FlashAttention-4's own local attention
  where ``flash_attn.cute`` imports, dense cuDNN (+qkv and alone), the projection alone.
* ``bigbird``: block 64, window 64, 2 global, 3 random blocks; N = 4k, 8k, 16k (dispatch; on CUDA also ``triton``
  and ``flex`` on 128-tiles) against dense cuDNN.
* ``scaling``: N = 4k ... 128k, sliding ±256 (dispatch) against dense cuDNN, with a chart.

The summary adds "ideal" (kept fraction x dense attention alone, + the projection alone for "(+qkv)" rows), and
checks the targets of issue 5 (against HF Longformer/BigBird where the peers ran in the same call).
"""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import ops

from .measure import Case, Options, measure
from .record import Row

TITLE = "sliding/longformer/bigbird sparse op vs FlexAttention (plain mask_mod) and dense cuDNN; scaling to 128k"
SECTIONS = {
    "sliding": "N=16384, ±256: op (dispatch, triton, flex), longformer, module, flex mask_mod, alone, dO given",
    "bigbird": "block 64, 3 random, 2 global; N = 4k, 8k, 16k vs dense cuDNN",
    "scaling": "sliding ±256 vs dense cuDNN from N=4k to 128k (time, memory, chart)",
}
PEERS = ("longformer", "bigbird")  # peers_bench.py groups measured beside this one
EXTRA_COLUMNS = ("kept", "tiles_visited", "tiles_full", "layout_build_ms")

__all__ = ["run", "summary", "TITLE", "SECTIONS", "PEERS"]

HID, NH = 768, 12
HD = HID // NH
WINDOW = 256
REP_MS = 150  # do_bench's rep, as the peers
_built: set = set()  # layouts built in this process (their build time is reported once, when fresh)


def attn_flops(kept_pairs: float) -> float:
    return 4.0 * NH * kept_pairs * HD


def band_counts(n: int, window: int) -> tuple[float, dict]:
    """(forward FLOPs, row extras) of a ±window band over n positions."""
    kept = sum(min(n - 1, i + window) - max(0, i - window) + 1 for i in range(n))
    return attn_flops(kept), {"kept": round(kept / n / n, 5)}


def projected(o: Options, n: int):
    """x [1, n, 768] -> one Linear to 2304 -> q, k, v [1, 12, n, 64] (strided views), as the peers."""
    lin = torch.nn.Linear(HID, 3 * HID, device=o.device, dtype=o.dtype)
    x = torch.randn(1, n, HID, device=o.device, dtype=o.dtype, requires_grad=True)

    def qkv():
        return lin(x).view(1, n, 3, NH, HD).permute(2, 0, 3, 1, 4)
    return qkv


def leaves(o: Options, n: int):
    return tuple(torch.randn(1, NH, n, HD, device=o.device, dtype=o.dtype, requires_grad=True) for _ in range(3))


def _sparse_backend() -> str:
    d = ops.last_sparse_decision()
    return d.backend if d is not None else ""


def op_case(o: Options, name: str, n: int, pattern, qkv=None, **op_kw) -> Case:
    """The op on ``pattern`` (default inputs: the projection), with the layout's figures as extras."""
    tile = op_kw.get("tile") or pattern.default_tile()
    key = (pattern, n, tile, o.device)
    t = time.perf_counter()
    lay = ops.compile_layout(pattern, n, tile, o.device)
    if o.cuda:
        torch.cuda.synchronize()
    extra = {"kept": round(lay.density, 5), "tiles_visited": lay.tiles_visited, "tiles_full": lay.tiles_full,
             "tile_density": round(lay.tile_density(), 5), "pattern": pattern.describe()}
    if key not in _built:  # the op reuses the cached layout: its build time is that of the first call
        _built.add(key)
        extra["layout_build_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    def make():
        inputs = qkv or projected(o, n)  # built here: a case's inputs live only while it is measured

        def f():
            q, k, v = inputs()
            return ops.sparse_attention(q, k, v, pattern, **op_kw)
        return f
    return Case(name, make, attn_flops(lay.kept_total), _sparse_backend, extra)


def dense_case(o: Options, n: int, name: str | None = None, inputs=None) -> Case:
    """Dense SDPA (cuDNN on CUDA, math on the CPU) on the projection (or on ``inputs()()``: a builder of the
    ``qkv`` callable, called when the case is built)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = [SDPBackend.CUDNN_ATTENTION] if o.cuda else [SDPBackend.MATH]
    def make():
        qkv = inputs() if inputs else projected(o, n)

        def f():
            q, k, v = qkv()
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v)
        return f
    label = "dense cuDNN SDPA" if o.cuda else "dense SDPA math"
    return Case(name or f"{label} (+qkv)", make, attn_flops(n * n), be[0].name.lower(), {"kept": 1.0})


def flex_case(o: Options, n: int, window: int, qkv=None, name: str = "flex plain mask_mod (+qkv)",
              **case_kw) -> Case:
    """FlexAttention with a plain mask_mod, built as peers_bench.py builds it (compiled on CUDA, eager elsewhere:
    no backward off CUDA), on ``qkv()`` (default: the projection)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if o.cuda:
        flex = torch.compile(flex_attention, dynamic=False)
    else:
        def flex(*args, **kwargs):  # eager (smoke runs): say nothing of the compile it would want
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return flex_attention(*args, **kwargs)
    def make():
        inputs = qkv or projected(o, n)
        bm = create_block_mask(lambda bb, h, qi, ki: (qi - ki).abs() <= window, None, None, n, n, device=o.device)

        def f():
            q, k, v = inputs()
            return flex(q, k, v, block_mask=bm)
        return f
    flops, extra = band_counts(n, window)
    return Case(name, make, flops, "flex_attention", extra, **case_kw)


def flash4_case(o: Options, n: int, window: int, qkv, **case_kw) -> Case | None:
    """FlashAttention-4's own local attention (``flash_attn.cute.flash_attn_func``, ``window_size=(w, w)``), its
    forward and backward, on the same q, k, v (views in its [B, N, H, D] layout, no copies). None unless it
    imports."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - not installed (or not importable here)
        o.log(f"  (no FlashAttention-4 row: {type(e).__name__}: {str(e)[:120]})")
        return None

    def make():
        q, k, v = qkv()

        def f():
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  window_size=(window, window))
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
        return f
    flops, extra = band_counts(n, window)
    return Case("FlashAttention-4 local window, kernels, dO given", make, flops, "flash_attn.cute", extra,
                **case_kw)


def module_case(o: Options, n: int, window: int) -> Case:
    def make():
        m = attnzoo.create("sliding_window", dim=HID, heads=NH, window=window).to(o.device, o.dtype)
        x = torch.randn(1, n, HID, device=o.device, dtype=o.dtype, requires_grad=True)
        return lambda: m(x)
    flops, extra = band_counts(n, window)
    return Case("attnzoo sliding_window module (q/k/v/o proj)", make, flops, "module", extra)


def proj_case(o: Options, n: int) -> Case:
    """The q/k/v projection alone (Linear 768 -> 2304 and the views), the part of every (+qkv) row that is not
    attention: the ideal of a sparse row is this plus the kept fraction of dense attention."""
    def make():
        qkv = projected(o, n)
        return lambda: qkv()[0]
    return Case("qkv projection alone", make, None, "", {"kept": 0.0})


def sliding(o: Options) -> list[Row]:
    n = 384 if o.smoke else 16384
    w = 16 if o.smoke else WINDOW
    pattern = ops.make_pattern("sliding_window", window=w)
    cases = [op_case(o, "attnzoo sliding_window op (+qkv)", n, pattern)]  # what dispatch picks
    if o.cuda:
        for be in ("triton", "flex"):
            cases.append(op_case(o, f"attnzoo sliding_window op, {be} (+qkv)", n, pattern, backend=be))
    cases += [op_case(o, "attnzoo longformer op, 1 global token (+qkv)", n,
                      ops.make_pattern("longformer", window=w, global_tokens=1)),
              module_case(o, n, w), flex_case(o, n, w)]
    # the same q, k, v leaves for the op and flex: through the loss, then given dO (the kernels alone)
    q, k, v = leaves(o, n)
    given = {"grad_of": lambda: (q, k, v), "modes": ("fwd+bwd",)}
    for suffix, kw in (("attention alone", {}), ("kernels, dO given", given)):
        op = op_case(o, f"attnzoo sliding_window op, {suffix}", n, pattern, qkv=lambda: (q, k, v))
        op.grad_of, op.modes = kw.get("grad_of"), kw.get("modes")
        op.extra.pop("layout_build_ms", None)
        cases.append(op)
        if o.cuda:  # eager FlexAttention has no backward off CUDA
            cases.append(flex_case(o, n, w, qkv=lambda: (q, k, v), name=f"flex plain mask_mod, {suffix}", **kw))
    if o.cuda:
        fa4 = flash4_case(o, n, w, lambda: (q, k, v), **given)
        if fa4 is not None:
            cases.append(fa4)
    cases.append(dense_case(o, n))
    if o.cuda:
        def dense_alone():
            q, k, v = leaves(o, n)
            return lambda: (q, k, v)
        cases.append(dense_case(o, n, name="dense cuDNN SDPA, attention alone", inputs=dense_alone))
    cases.append(proj_case(o, n))
    return measure(o, "sliding", n, cases, rep_ms=REP_MS)


def bigbird(o: Options) -> list[Row]:
    rows: list[Row] = []
    blk = 16 if o.smoke else 64
    for n in [256, 512] if o.smoke else [4096, 8192, 16384]:
        pattern = ops.make_pattern("bigbird", block_size=blk, window=blk, global_blocks=2, random_blocks=3)
        cases = [op_case(o, "attnzoo bigbird op (+qkv)", n, pattern)]
        if o.cuda:
            cases.append(op_case(o, "attnzoo bigbird op, triton (+qkv)", n, pattern, backend="triton"))
            cases.append(op_case(o, "attnzoo bigbird op, flex 128-tiles (+qkv)", n, pattern, backend="flex",
                                 tile=128))
        cases.append(dense_case(o, n))
        rows += measure(o, "bigbird", n, cases, rep_ms=REP_MS)
    return rows


def scaling(o: Options) -> list[Row]:
    rows: list[Row] = []
    w = 16 if o.smoke else WINDOW
    for n in [128, 256] if o.smoke else [4096, 8192, 16384, 32768, 65536, 131072]:
        pattern = ops.make_pattern("sliding_window", window=w)
        rows += measure(o, "scaling", n, [op_case(o, "attnzoo sliding_window op (+qkv)", n, pattern),
                                          dense_case(o, n)], rep_ms=REP_MS)
    return rows


def run(o: Options) -> list[Row]:
    if o.cuda:  # one compiled FlexAttention per shape and mask: more than dynamo's default cache holds
        import torch._dynamo as dynamo

        for knob in ("recompile_limit", "cache_size_limit", "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 4096))
    rows: list[Row] = []
    for section, fn in (("sliding", sliding), ("bigbird", bigbird), ("scaling", scaling)):
        if o.wants(section):
            o.log(f"== sparse: {section}")
            rows += fn(o)
    return rows


# ---------------------------------------------------------------------------- summary
def _find(rows: list[Row], group: str, prefix: str, n: int, mode: str) -> Row | None:
    for r in rows:
        if r.group == group and r.name.startswith(prefix) and r.n == n and r.mode == mode and r.ok:
            return r
    return None


def ideal_table(rows: list[Row]) -> list[dict]:
    """Each attnzoo row against dense and the ideal: kept fraction x dense attention alone (+ the projection alone
    for "(+qkv)" rows); where those rows are missing (bigbird, scaling), kept x dense (+qkv), lower still."""
    out = []
    for r in rows:
        if not (r.name.startswith("attnzoo") and "kept" in r.extra and r.ok):
            continue
        d = next((x for x in rows if x.group == r.group and x.name.startswith("dense") and x.name.endswith("(+qkv)")
                  and x.n == r.n and x.mode == r.mode and x.ok), None)
        da = _find(rows, r.group, "dense cuDNN SDPA, attention alone", r.n, r.mode)
        pj = _find(rows, r.group, "qkv projection alone", r.n, r.mode)
        kept = r.extra["kept"]
        if da and "(+qkv)" not in r.name and "module" not in r.name:
            ideal_ms, how = da.ms * kept, "kept x attention"
        elif da and pj:
            ideal_ms, how = da.ms * kept + pj.ms, "kept x attention + projection"
        elif d:
            ideal_ms, how = d.ms * kept, "kept x dense(+qkv)"
        else:
            continue
        if not ideal_ms:
            continue
        out.append({"section": r.group, "name": r.name, "n": r.n, "mode": r.mode, "ms": r.ms,
                    "dense ms": d.ms if d else None, "ideal ms": round(ideal_ms, 4), "ideal": how,
                    "x ideal": round(r.ms / ideal_ms, 2), "speedup vs dense": round(d.ms / r.ms, 2) if d else None})
    return out


def targets(rows: list[Row], peers: list[Row]) -> list[str]:
    """The targets of issue 5, each checked where its rows were measured."""
    out: list[str] = []

    def check(label, ok, detail):
        out.append(f"- [{'x' if ok else ' '}] {label}: {detail}")

    def peer(name, n, mode):
        return next((p for p in peers if p.name == name and p.n == n and p.mode == mode and p.ok), None)

    n = max((r.n for r in rows if r.group == "sliding"), default=0)
    for mode in ("fwd", "fwd+bwd"):
        best = _find(rows, "sliding", "attnzoo sliding_window op (+qkv)", n, mode)  # what dispatch picks
        if best is None:
            continue
        pairs = [(best, _find(rows, "sliding", "flex plain mask_mod (+qkv)", n, mode), "+qkv")]
        for what in ("attention alone", "kernels, dO given"):
            pairs.append((_find(rows, "sliding", f"attnzoo sliding_window op, {what}", n, mode),
                          _find(rows, "sliding", f"flex plain mask_mod, {what}", n, mode), what))
        for ours, flex, what in pairs:
            if not (ours and flex):
                continue
            for key, clock in (("ms", "do_bench"), ("gpu_ms", "CUDA graph")):
                a, b = getattr(ours, key), getattr(flex, key)
                if a and b:
                    check(f"sliding N={n} {mode} ({what}, {clock}) >= 1.5x faster than flex mask_mod", b / a >= 1.5,
                          f"{a:.3f} ms vs {b:.3f} ms: {b / a:.2f}x")
        kernels, fx = pairs[-1][0], pairs[-1][1]
        fa4 = _find(rows, "sliding", "FlashAttention-4 local window, kernels, dO given", n, mode)
        if fa4 and kernels and fa4.gpu_ms and kernels.gpu_ms:
            out.append(f"- FlashAttention-4's own local attention (its forward and backward), kernels, dO given, CUDA "
                       f"graph: {fa4.gpu_ms:.3f} ms; the op {kernels.gpu_ms:.3f} ms ({fa4.gpu_ms / kernels.gpu_ms:.2f}x "
                       "its time)" + (f"; flex mask_mod / it = {fx.gpu_ms / fa4.gpu_ms:.2f}x" if fx and fx.gpu_ms
                                      else ""))
        da = _find(rows, "sliding", "dense cuDNN SDPA, attention alone", n, mode)
        pj = _find(rows, "sliding", "qkv projection alone", n, mode)
        if da and pj:
            ideal = da.ms * best.extra["kept"] + pj.ms
            check(f"sliding N={n} {mode} within 3x of ideal", best.ms <= 3 * ideal,
                  f"{best.ms:.3f} ms vs ideal {ideal:.3f} ms ({best.extra['kept']:.4f} x {da.ms:.3f} ms attention "
                  f"+ {pj.ms:.3f} ms projection): {best.ms / ideal:.2f}x")
        hf = peer("hf-LongformerSelfAttention", n, mode)
        if hf:
            check(f"sliding N={n} {mode} >= 10x faster than HF Longformer", hf.ms / best.ms >= 10,
                  f"{hf.ms:.3f} ms / {best.ms:.3f} ms = {hf.ms / best.ms:.1f}x (do_bench, as HF is timed)"
                  + (f"; device time {best.gpu_ms:.3f} ms" if best.gpu_ms else ""))
    for r in rows:
        if r.group != "bigbird" or not r.name.startswith("attnzoo") or not r.ok:
            continue
        dense = _find(rows, "bigbird", "dense", r.n, r.mode)
        if dense and r.n >= 8192:
            check(f"{r.name} N={r.n} {r.mode} faster than dense cuDNN", r.ms < dense.ms,
                  f"{r.ms:.3f} ms vs {dense.ms:.3f} ms (do_bench)" + (
                      f"; CUDA graph {r.gpu_ms:.3f} vs {dense.gpu_ms:.3f} ms" if r.gpu_ms and dense.gpu_ms else ""))
        hf = peer("hf-BigBirdBlockSparseAttention", r.n, r.mode)
        if hf:
            check(f"{r.name} N={r.n} {r.mode} >= 10x faster than HF BigBird", hf.ms / r.ms >= 10,
                  f"{hf.ms:.3f} ms / {r.ms:.3f} ms = {hf.ms / r.ms:.1f}x")
    if not peers:
        out.append("- (no peers in this run: the HF ratios are not checked; pass `--peers PATH/peers_bench.py`)")
    return out


def plot_scaling(rows: list[Row], path: str) -> str | None:
    """Log-log chart of the scaling section (device time, else do_bench time, and peak memory vs N, forward +
    backward): the op against dense. Returns the path, or None without matplotlib or scaling rows."""
    pts = [r for r in rows if r.group == "scaling" and r.mode == "fwd+bwd" and r.ok]
    if not pts:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r.name for r in pts}):
        sel = sorted((r for r in pts if r.name == name), key=lambda r: r.n)
        style = "o-" if name.startswith("attnzoo") else "s--"
        axes[0].plot([r.n for r in sel], [r.gpu_ms or r.ms for r in sel], style, label=name)
        mem = [r for r in sel if r.peak_mb]  # measured on CUDA only
        if mem:
            axes[1].plot([r.n for r in mem], [r.peak_mb for r in mem], style, label=name)
    for ax, ylabel in zip(axes, ("forward+backward ms (device time)", "peak memory MiB")):
        if not ax.lines:
            ax.set_axis_off()
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("sliding window ±256 vs dense attention (hidden 768, 12 heads, batch 1, +qkv projection)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(rows: list[Row], peers: list[Row], out_dir: str | None = None, stem: str = "sparse") -> list[str]:
    from ..table import markdown_table

    lines: list[str] = []
    ideal = ideal_table(rows)
    if ideal:
        lines += ["## against dense and the ideal", "", markdown_table(ideal), ""]
    lines += ["## targets", ""] + targets(rows, peers)
    if out_dir:
        chart = plot_scaling(rows, os.path.join(out_dir, f"{stem}-scaling.png"))
        if chart:
            lines += ["", f"![scaling]({os.path.basename(chart)})"]
    return lines
