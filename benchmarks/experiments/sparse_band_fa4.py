"""Experiment (round 7): FlashAttention-4's local attention (flash_attn.cute, SM90 kernels) on the band.

Not library code: a record of what was measured for ``benchmarks/results/sparse-band-experiments-h200.md``
(round 7), like ``sparse_band_kernels.py`` for rounds 1-4. Needs flash-attn-4 (4.0.0b36 was measured) and the
CuTe DSL (``nvidia-cutlass-dsl``) on the GPU machine.

* ``compare`` (default): at N=16384 (bidirectional and causal), 65536 and 4096, device times (CUDA graphs, and the
  kernels' sum from torch.profiler) of attnzoo's kernels, compiled FlexAttention with a plain mask_mod,
  FlashAttention-4's ``flash_attn_func(window_size=...)``, its forward with other tiles (``tile_mn``), and the
  hybrid that the library adopted: attnzoo's forward, then FlashAttention-4's backward
  (``interface._flash_attn_bwd``) on attnzoo's output and log-sum-exp (base 2 -> natural log).
* ``bwd-configs``: FlashAttention-4's SM90 backward with other tile configurations (``_tile_size_bwd_sm90``
  replaced), N=16384 bidirectional.

Run on an H200: ``python benchmarks/experiments/sparse_band_fa4.py [compare|bwd-configs]``.
"""
import math
import os
import sys
import time
import traceback

import timing
import torch
import triton
from timing import Log, kernel_us

OUT = os.environ.get("OUT", ".")
P = Log(os.path.join(OUT, "fa4b.log"))


os.environ["ATTNZOO_SPARSE_AUTOTUNE"] = "0"
from attnzoo.ops.sparse import SlidingWindow, compile_layout  # noqa: E402
from attnzoo.ops.sparse import triton_kernel as tk  # noqa: E402
from flash_attn.cute import flash_attn_func  # noqa: E402
from flash_attn.cute import interface as fai  # noqa: E402
from flash_attn.cute.interface import BwdConfig  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

dev = "cuda"
dt = torch.bfloat16
B, H, D, W = 1, 12, 64, 256
T0 = time.time()
LN2 = math.log(2.0)
torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)


def graph_us(fn, name=""):
    try:
        return timing.graph_us(fn)
    except Exception as e:  # noqa: BLE001
        P(f"  [{name}] cudagraph failed: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.synchronize()
        return float("nan")


def prof_us(fn, name, iters=20):
    """Sum of device kernel times per call (torch.profiler), and the kernels."""
    tot = kernel_us(fn, iters)
    s = sum(tot.values())
    top = list(tot.items())[:8]
    P(f"  [{name}] profiler kernel sum {s:.1f} us: " + "; ".join(f"{k[:60]} {v:.1f}" for k, v in top))
    return s


def err(a, b):
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)


P(f"== fa4 round7 {time.strftime('%F %T')} {torch.cuda.get_device_name()} torch {torch.__version__} "
  f"triton {triton.__version__}")
flex = torch.compile(flex_attention, dynamic=False)


def run_case(N, causal):
    wr = 0 if causal else W
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(4))
    lay = compile_layout(SlidingWindow(window=W, causal=causal), N, 128, dev)
    # reference grads (ours), graph freed afterwards
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    o_ref = tk.block_sparse_attention(ql, kl, vl, lay)
    g_ref = [g.detach() for g in torch.autograd.grad(o_ref, (ql, kl, vl), do)]
    o_ref = o_ref.detach()
    del ql, kl, vl
    r = {}

    def leaves():
        return [t.clone().requires_grad_() for t in (q, k, v)]

    a = leaves()
    r["ours_fb"] = graph_us(lambda: torch.autograd.grad(tk.block_sparse_attention(*a, lay), a, do), "ours_fb")
    r["ours_f"] = graph_us(lambda: tk.block_sparse_attention(q, k, v, lay), "ours_f")
    r["ours_fb_prof"] = prof_us(lambda: torch.autograd.grad(tk.block_sparse_attention(*a, lay), a, do), "ours_fb")

    mm = (lambda b_, h_, i, j: (i - j <= W) & (i >= j)) if causal else (lambda b_, h_, i, j: (i - j).abs() <= W)
    bm = create_block_mask(mm, None, None, N, N, device=dev)
    f = leaves()
    r["flex_fb"] = graph_us(lambda: torch.autograd.grad(flex(*f, block_mask=bm), f, do), "flex_fb")
    r["flex_fb_prof"] = prof_us(lambda: torch.autograd.grad(flex(*f, block_mask=bm), f, do), "flex_fb")

    c = leaves()

    def fa_fwd(x, y, z):
        o = flash_attn_func(x.transpose(1, 2), y.transpose(1, 2), z.transpose(1, 2), window_size=(W, wr))
        return (o[0] if isinstance(o, tuple) else o).transpose(1, 2)
    o = fa_fwd(*c)
    gf = torch.autograd.grad(o, c, do)
    r["fa_err_o"] = err(o, o_ref)
    r.update({f"fa_err_{n}": err(x, y) for n, x, y in zip("qkv", gf, g_ref)})
    del o, gf
    r["fa_fb"] = graph_us(lambda: torch.autograd.grad(fa_fwd(*c), c, do), "fa_fb")
    r["fa_fb_prof"] = prof_us(lambda: torch.autograd.grad(fa_fwd(*c), c, do), "fa_fb")
    with torch.no_grad():
        r["fa_f"] = graph_us(lambda: fa_fwd(q, k, v), "fa_f")
        r["fa_f_prof"] = prof_us(lambda: fa_fwd(q, k, v), "fa_f")
    # forward tiles
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
    for tile in ((128, 128), (128, 64), (192, 128), (64, 128)):
        try:
            fn = lambda: fai._flash_attn_fwd(qt, kt, vt, causal=False, window_size_left=W, window_size_right=wr,  # noqa: E731
                                            tile_mn=tile, return_lse=True)
            ot = fn()[0]
            r[f"fa_f_tile{tile[0]}x{tile[1]}_err"] = err(ot.transpose(1, 2), o_ref)
            r[f"fa_f_tile{tile[0]}x{tile[1]}"] = graph_us(fn, f"tile{tile}")
        except Exception as e:  # noqa: BLE001
            P(f"  tile {tile} failed: {type(e).__name__}: {str(e)[:300]}")
    # hybrid: our forward, FA4's backward on our out and LSE (log2 -> natural)
    try:
        rec = []
        orig = tk._launch

        def spy(kernel, grid, args, constexprs):
            rec.append(args)
            orig(kernel, grid, args, constexprs)
        tk._launch = spy
        with torch.no_grad():
            o2 = tk.block_sparse_attention(q, k, v, lay)
        tk._launch = orig
        lse2 = rec[0][4]
        P(f"  our lse tensor shape {tuple(lse2.shape)} dtype {lse2.dtype}")
        lse_nat = (lse2.view(B, H, N) * LN2).contiguous()
        ot = o2.transpose(1, 2)

        def fa_bwd():
            return fai._flash_attn_bwd(qt, kt, vt, ot, dot, lse_nat, 1 / math.sqrt(D), False,
                                       window_size_left=W, window_size_right=wr)
        dq, dk, dv = fa_bwd()[:3]
        r.update({f"hyb_err_d{n}": err(x.transpose(1, 2), y) for n, x, y in zip("qkv", (dq, dk, dv), g_ref)})
        r["fa_bwd_only"] = graph_us(fa_bwd, "fa_bwd")
        r["fa_bwd_only_prof"] = prof_us(fa_bwd, "fa_bwd")
        r["hybrid_sum"] = r["ours_f"] + r["fa_bwd_only"]
    except Exception as e:  # noqa: BLE001
        P(f"  hybrid failed: {type(e).__name__}: {str(e)[:400]}")
        traceback.print_exc()
    for key in ("ours_fb", "fa_fb", "hybrid_sum"):
        if key in r:
            r[f"ratio_flex/{key}"] = r["flex_fb"] / r[key]
    P(f"N={N} causal={causal} " + " ".join(f"{k}={v:.4g}" for k, v in r.items()))


def compare():
    for N, causal in [(16384, False), (16384, True), (65536, False), (4096, False)]:
        if time.time() - T0 > 420:
            P("stopping: time")
            break
        try:
            run_case(N, causal)
        except Exception as e:  # noqa: BLE001
            P(f"N={N} causal={causal} failed: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()


def cfg(m, n, sq=2, sdo=2, spds=2, sdp_swap=True, dkv_swap=False, dq_swap=False, a_sdp=1, a_dkv=2, a_dq=2,
        single=False):
    return BwdConfig(m, n, sq, sdo, spds, sdp_swap, dkv_swap, dq_swap, a_sdp, a_dkv, a_dq, 2, single)


CONFIGS = {
    "default": None,
    "m64n128_single": cfg(64, 128, a_dq=1, single=True),
    "m64n128": cfg(64, 128, a_dq=1),
    "m64n128_dq2": cfg(64, 128, a_dq=2),
    "m128n64": cfg(128, 64, a_dkv=1),
    "m64n64": cfg(64, 64, a_dkv=1, a_dq=1),
    "m128n128_q3": cfg(128, 128, sq=3, sdo=3, spds=1),
    "m64n128_q3": cfg(64, 128, sq=3, sdo=3, spds=1, a_dq=1),
    "m128n128_noswap": cfg(128, 128, sdp_swap=False, a_sdp=2),
    "m64n128_single_noswap": cfg(64, 128, sdp_swap=False, a_dq=1, single=True),
}



def bwd_configs():
    orig_cfg = fai._tile_size_bwd_sm90
    P(f"== fa4 round7b {time.strftime('%F %T')} {torch.cuda.get_device_name()} torch {torch.__version__}")
    for N in (16384,):
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(4))
        lay = compile_layout(SlidingWindow(window=W), N, 128, dev)
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        o_ref = tk.block_sparse_attention(ql, kl, vl, lay)
        g_ref = [g.detach() for g in torch.autograd.grad(o_ref, (ql, kl, vl), do)]
        o_ref = o_ref.detach()
        del ql, kl, vl
        a = [t.clone().requires_grad_() for t in (q, k, v)]
        ours_fb = graph_us(lambda: torch.autograd.grad(tk.block_sparse_attention(*a, lay), a, do))
        ours_f = graph_us(lambda: tk.block_sparse_attention(q, k, v, lay))
        bm = create_block_mask(lambda b_, h_, i, j: (i - j).abs() <= W, None, None, N, N, device=dev)
        f = [t.clone().requires_grad_() for t in (q, k, v)]
        flex_fb = graph_us(lambda: torch.autograd.grad(flex(*f, block_mask=bm), f, do))
        P(f"N={N} ours_fb={ours_fb:.1f} ours_f={ours_f:.1f} flex_fb={flex_fb:.1f} ratio={flex_fb / ours_fb:.3f}")
        qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))
        fwd = lambda: fai._flash_attn_fwd(qt, kt, vt, window_size_left=W, window_size_right=W,  # noqa: E731
                                         tile_mn=(128, 128), return_lse=True)
        o_fa, lse_fa = fwd()[:2]
        fa_f = graph_us(fwd)
        P(f"  fa fwd 128x128 {fa_f:.1f} us, err {err(o_fa.transpose(1, 2), o_ref):.3g}, lse {tuple(lse_fa.shape)}")
        best = None
        for name, c in CONFIGS.items():
            if time.time() - T0 > 480:
                P("stopping: time")
                break
            fai._tile_size_bwd_sm90 = orig_cfg if c is None else (lambda *args, _c=c, **kw: _c)
            try:
                bwd = lambda: fai._flash_attn_bwd(qt, kt, vt, o_fa, dot, lse_fa, 1 / math.sqrt(D), False,  # noqa: E731
                                                 window_size_left=W, window_size_right=W)
                t0 = time.time()
                dq, dk, dv = bwd()[:3]
                torch.cuda.synchronize()
                cs = time.time() - t0
                e = max(err(x.transpose(1, 2), y) for x, y in zip((dq, dk, dv), g_ref))
                us = graph_us(bwd)
                tot = fa_f + us
                P(f"  bwd {name:24s} {us:7.1f} us (compile {cs:.1f} s, max rel err {e:.3g}) fa total {tot:.1f} "
                  f"-> {flex_fb / tot:.3f}x flex; ours fwd + it {ours_f + us:.1f} -> {flex_fb / (ours_f + us):.3f}x")
                if e < 2e-2 and (best is None or us < best[1]):
                    best = (name, us)
            except Exception as ex:  # noqa: BLE001
                P(f"  bwd {name} failed: {type(ex).__name__}: {str(ex)[:300]}")
            finally:
                fai._tile_size_bwd_sm90 = orig_cfg
        P(f"  best bwd {best}")
        if best is not None:
            c = CONFIGS[best[0]]
            fai._tile_size_bwd_sm90 = orig_cfg if c is None else (lambda *args, _c=c, **kw: _c)
            bwd = lambda: fai._flash_attn_bwd(qt, kt, vt, o_fa, dot, lse_fa, 1 / math.sqrt(D), False,  # noqa: E731
                                             window_size_left=W, window_size_right=W)
            P("  best bwd kernels: " + "; ".join(f"{k[:70]} {v:.1f}" for k, v in kernel_us(bwd).items()))
            fai._tile_size_bwd_sm90 = orig_cfg


if __name__ == "__main__":
    {"compare": compare, "bwd-configs": bwd_configs}[sys.argv[1] if len(sys.argv) > 1 else "compare"]()
    P(f"done in {time.time() - T0:.0f} s")
