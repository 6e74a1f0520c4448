"""Experiment (round 8): the band forward's fixed softmax reference, adopted with a separate redo launch.

Not library code: a record of what was measured for ``benchmarks/results/sparse-band-experiments-h200.md``
(round 8). Each case measures, in one process and alternating (A B A B ...) so that drift hits both alike:

* the forward alone, and the forward + backward given dO (what ``sparse_bench.py`` calls "kernels"), with
  ``triton_kernel.FIXED_REFERENCE`` True (stage 1 + the redo launch) and False (the running max);
* FlexAttention with a plain mask_mod (compiled, ``create_block_mask``), forward + backward, same inputs;
* each kernel's device time per call from torch.profiler (fixed reference on), to see the redo launch's cost;
* a check of every output against the running-max path.

Run at 11d9900 (fixed and running) and 6ed4a11, which also had ``REDO_IN_KERNEL`` (the redo as a noinline call
inside the same kernel, the "inkernel" variant): slower, removed in 1c109a1, which also keeps the fixed reference
to wide bands and long inputs (``FIXED_MIN_WIDTH``, ``FIXED_MIN_ROWS``). At later commits this script's "fixed" and
"inkernel" rows are the library's choice, the same.

Device times come from CUDA graphs (``do_bench_cudagraph``, medians). The backward is FlashAttention-4's where it
imports (as in the library), else attnzoo's. Run on an H200: ``python benchmarks/experiments/sparse_band_fixed_ref.py``
(``OUT`` names the output folder; one JSON line per case in ``fixed_ref.jsonl``).
"""
import json
import os

import torch
from timing import graph_us, kernel_us

os.environ.setdefault("ATTNZOO_SPARSE_AUTOTUNE", "0")
from attnzoo.ops.sparse import SlidingWindow, compile_layout  # noqa: E402
from attnzoo.ops.sparse import triton_kernel as tk  # noqa: E402
from attnzoo.ops.sparse.fa4_backward import which_band_backward  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

OUT = os.environ.get("OUT", ".")
dev, dt = "cuda", torch.bfloat16
B, H, D, W = 1, 12, 64, 256
REPEATS = 3
flex = torch.compile(flex_attention, dynamic=False)


def run_case(n, causal):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, n, D, device=dev, dtype=dt) for _ in range(4))
    lay = compile_layout(SlidingWindow(window=W, causal=causal), n, 128, dev)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    r = {"n": n, "causal": causal, "backward": which_band_backward(leaves[0], SlidingWindow(window=W, causal=causal))}

    def fwd():
        return tk.block_sparse_attention(q, k, v, lay)

    def fb():
        return torch.autograd.grad(tk.block_sparse_attention(*leaves, lay), leaves, do)

    variants = {"running": (False, False), "fixed": (True, False), "inkernel": (True, True)}

    def use(name):
        tk.FIXED_REFERENCE, tk.REDO_IN_KERNEL = variants[name]

    outs = {}
    for name in variants:
        use(name)
        outs[name] = (fwd(), fb())
    for name in ("fixed", "inkernel"):
        r[f"max_rel_err_{name}"] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                       for a, b in zip((outs[name][0], *outs[name][1]),
                                                       (outs["running"][0], *outs["running"][1])))
    for name in variants:
        r[f"fwd_{name}"], r[f"fb_{name}"] = [], []
    for _ in range(REPEATS):
        for name in variants:
            use(name)
            r[f"fwd_{name}"].append(round(graph_us(fwd), 1))
            r[f"fb_{name}"].append(round(graph_us(fb), 1))
    use("fixed")
    r["kernels_fixed"] = {k_: round(t, 1) for k_, t in list(kernel_us(fb, name=lambda kn: kn[:60]).items())[:8]}
    use("inkernel")
    r["kernels_inkernel"] = {k_: round(t, 1) for k_, t in list(kernel_us(fb, name=lambda kn: kn[:60]).items())[:8]}
    mm = (lambda b_, h_, i, j: (i - j <= W) & (i >= j)) if causal else (lambda b_, h_, i, j: (i - j).abs() <= W)
    bm = create_block_mask(mm, None, None, n, n, device=dev)
    f = [t.clone().requires_grad_() for t in (q, k, v)]
    r["flex_fb"] = [round(graph_us(lambda: torch.autograd.grad(flex(*f, block_mask=bm), f, do)), 1)
                    for _ in range(2)]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for name in variants:
        r[f"ratio_flex_{name}"] = round(med(r["flex_fb"]) / med(r[f"fb_{name}"]), 3)
    print(json.dumps(r), flush=True)
    with open(os.path.join(OUT, "fixed_ref.jsonl"), "a") as fh:
        fh.write(json.dumps(r) + "\n")


def overflow_check():
    """Rows whose kept score lies ~580 log2-units above their own: every variant against the running max."""
    n = 4096
    torch.manual_seed(1)
    q, k, v, do = (torch.randn(2, H, n, D, device=dev, dtype=dt) for _ in range(4))
    for b, h, i in [(0, 0, 3), (0, 7, 700), (1, 2, 1023), (1, 5, n - 1), (1, 11, 2000)]:
        q[b, h, i] = 0.0
        q[b, h, i, 0] = 40.0
        k[b, h, i - 3] = 0.0
        k[b, h, i - 3, 0] = 40.0
        k[b, h, i] = -k[b, h, i - 3]
    lay = compile_layout(SlidingWindow(window=W), n, 128, dev)
    res = {}
    for name, (fixed, ink) in {"running": (False, False), "fixed": (True, False), "inkernel": (True, True)}.items():
        tk.FIXED_REFERENCE, tk.REDO_IN_KERNEL = fixed, ink
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = tk.block_sparse_attention(*leaves, lay)
        res[name] = (o.detach(), *torch.autograd.grad(o, leaves, do))
    r = {"overflow_check": {name: max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                      for a, b in zip(res[name], res["running"])) for name in ("fixed", "inkernel")},
         "finite": {name: all(bool(torch.isfinite(t).all()) for t in res[name]) for name in res}}
    print(json.dumps(r), flush=True)
    with open(os.path.join(OUT, "fixed_ref.jsonl"), "a") as fh:
        fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    print(torch.__version__, torch.cuda.get_device_name(), os.environ.get("ATTNZOO_COMMIT"), flush=True)
    overflow_check()
    for n, causal in ((16384, False), (16384, True), (4096, False), (65536, False)):
        run_case(n, causal)
