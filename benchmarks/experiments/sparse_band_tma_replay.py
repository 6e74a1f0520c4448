"""Experiment (round 9): TMA loads in the band forward, and replaying FlashAttention-4's compiled backward.

Not library code: a record of what was measured for ``benchmarks/results/sparse-band-experiments-h200.md``
(round 9). Two switches of the library, compared in one process and alternating (A B A B ...) so that drift hits
both alike:

* ``triton_kernel.TMA_LOADS``: the band forward reads its K/V blocks through TMA tensor descriptors (True) or
  through pointers (False). Device time (CUDA graphs) of the forward alone and of the forward + backward given dO
  (``sparse_bench.py``'s "kernels"), with the library's choice of softmax reference at each size, against
  FlexAttention with a plain mask_mod in the same process; outputs checked against the pointer path.
* ``fa4_backward.DIRECT``: later backward calls replay FlashAttention-4's three compiled kernels (True) or go
  through its Python wrapper (False). Host time per forward + backward call, measured with the GPU kept busy
  (a sleep kernel queued first) so the host never waits; device time is the same kernels either way.

Run on an H200 with flash-attn-4: ``python benchmarks/experiments/sparse_band_tma_replay.py`` (``OUT`` names the
output folder; one JSON line per case in ``tma_replay.jsonl``).
"""
import json
import os

import torch
import triton.testing as tt
from timing import graph_us, host_us

os.environ.setdefault("ATTNZOO_SPARSE_AUTOTUNE", "0")
from attnzoo.ops.sparse import SlidingWindow, compile_layout  # noqa: E402
from attnzoo.ops.sparse import fa4_backward  # noqa: E402
from attnzoo.ops.sparse import triton_kernel as tk  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

OUT = os.environ.get("OUT", ".")
dev, dt = "cuda", torch.bfloat16
B, H, D, W = 1, 12, 64, 256
REPEATS = 3
flex = torch.compile(flex_attention, dynamic=False)
med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731


def emit(r):
    print(json.dumps(r), flush=True)
    with open(os.path.join(OUT, "tma_replay.jsonl"), "a") as fh:
        fh.write(json.dumps(r) + "\n")


def run_case(n, causal, host=False):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, n, D, device=dev, dtype=dt) for _ in range(4))
    pattern = SlidingWindow(window=W, causal=causal)
    lay = compile_layout(pattern, n, 128, dev)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    r = {"n": n, "causal": causal, "backward": fa4_backward.which_band_backward(leaves[0], pattern),
         "fixed_reference": tk._fixed_reference(tk.plan(lay), False, dt, B * H * n),
         "tma_descriptors": tk._tma_descriptors(k, v) is not None}

    def fwd():
        return tk.block_sparse_attention(q, k, v, lay)

    def fb():
        return torch.autograd.grad(tk.block_sparse_attention(*leaves, lay), leaves, do)

    outs = {}
    for tma in (False, True):
        tk.TMA_LOADS = tma
        outs[tma] = (fwd(), fb())
    r["tma_vs_pointers_max_abs"] = max((a.float() - b.float()).abs().max().item()
                                       for a, b in zip((outs[True][0], *outs[True][1]),
                                                       (outs[False][0], *outs[False][1])))
    for tma in ("pointers", "tma"):
        r[f"fwd_{tma}"], r[f"fb_{tma}"] = [], []
    for _ in range(REPEATS):
        for tma in (False, True):
            tk.TMA_LOADS = tma
            name = "tma" if tma else "pointers"
            r[f"fwd_{name}"].append(round(graph_us(fwd), 1))
            r[f"fb_{name}"].append(round(graph_us(fb), 1))
    mm = (lambda b_, h_, i, j: (i - j <= W) & (i >= j)) if causal else (lambda b_, h_, i, j: (i - j).abs() <= W)
    bm = create_block_mask(mm, None, None, n, n, device=dev)
    f = [t.clone().requires_grad_() for t in (q, k, v)]
    r["flex_fb"] = [round(graph_us(lambda: torch.autograd.grad(flex(*f, block_mask=bm), f, do)), 1)
                    for _ in range(2)]
    for name in ("pointers", "tma"):
        r[f"ratio_flex_{name}"] = round(med(r["flex_fb"]) / med(r[f"fb_{name}"]), 3)
    if host:  # host µs per call: TMA x FlashAttention-4 replay, alternating
        for name in ("fwd", "fb"):
            for tma in (False, True):
                for direct in (False, True):
                    r[f"host_{name}_{'tma' if tma else 'pointers'}_{'replay' if direct else 'wrapper'}"] = []
        for _ in range(REPEATS):
            for tma in (False, True):
                for direct in (False, True):
                    tk.TMA_LOADS, fa4_backward.DIRECT = tma, direct
                    fa4_backward._direct.clear()
                    fb()  # the first call of the signature: through the wrapper (and recorded)
                    tag = f"{'tma' if tma else 'pointers'}_{'replay' if direct else 'wrapper'}"
                    r[f"host_fwd_{tag}"].append(round(host_us(fwd, 40, warmup=3), 1))
                    r[f"host_fb_{tag}"].append(round(host_us(fb, 40, warmup=3), 1))
        r["flex_host_fb"] = round(host_us(lambda: torch.autograd.grad(flex(*f, block_mask=bm), f, do), 40, warmup=3), 1)
        fa4_backward.DIRECT = True
    tk.TMA_LOADS = True
    emit(r)


def step_case(n=16384):
    """The sparse_bench "(+qkv)" step (projection 768 -> 2304, the op, out.float().sum() backward): do_bench
    (host included) and CUDA-graph medians with the library defaults (TMA, replay) against both switched off."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 3 * 768, device=dev, dtype=dt)
    x = torch.randn(B, n, 768, device=dev, dtype=dt, requires_grad=True)
    pattern = SlidingWindow(window=W)
    lay = compile_layout(pattern, n, 128, dev)

    def step():
        q, k, v = lin(x).view(B, n, 3, H, D).permute(2, 0, 3, 1, 4)
        tk.block_sparse_attention(q, k, v, lay).float().sum().backward()

    r = {"case": "(+qkv) step", "n": n}
    for name in ("off", "on"):
        r[f"do_bench_{name}"], r[f"graph_{name}"], r[f"host_{name}"] = [], [], []
    for _ in range(REPEATS):
        for on in (False, True):
            tk.TMA_LOADS, fa4_backward.DIRECT = on, on
            fa4_backward._direct.clear()
            step()
            name = "on" if on else "off"
            r[f"do_bench_{name}"].append(round(tt.do_bench(step, grad_to_none=[x, *lin.parameters()],
                                                           return_mode="median") * 1e3, 1))
            r[f"graph_{name}"].append(round(graph_us(step), 1))
            r[f"host_{name}"].append(round(host_us(step, 40, warmup=3), 1))
    tk.TMA_LOADS, fa4_backward.DIRECT = True, True
    emit(r)


if __name__ == "__main__":
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    print(torch.__version__, torch.cuda.get_device_name(), os.environ.get("ATTNZOO_COMMIT"), flush=True)
    run_case(16384, False, host=True)
    run_case(16384, True)
    run_case(4096, False)
    run_case(65536, False)
    step_case()
