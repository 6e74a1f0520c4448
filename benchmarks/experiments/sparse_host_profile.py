"""Experiment (round 9): where the host time of the sliding-window op goes, with the library's defaults (TMA
forward, FlashAttention-4 backward replayed), ±256, N=16384, 12 heads, d=64, bf16.

Not library code. The GPU is kept busy with a long sleep kernel so the host never waits; host time per call
(medians of five runs of 30 calls, with Python's garbage collector on and off), then cProfile of 30 calls
(top entries by own time and by cumulative time). Cases: the op forward, the op forward + backward given dO,
and the sparse_bench "(+qkv)" step (projection, op, ``out.float().sum()`` backward). Run from the repo root on
a GPU machine; writes ``$OUT/host_profile.txt``.
"""
import cProfile
import gc
import io
import os
import pstats

import torch
from timing import Log, host_us

from attnzoo.ops import sparse_attention
from attnzoo.ops.sparse import SlidingWindow

OUT = os.environ.get("OUT", ".")
P = Log(os.path.join(OUT, "host_profile.txt"), "w")


dev, dt, n = "cuda", torch.bfloat16, 16384
pat = SlidingWindow(window=256)
q, k, v = (torch.randn(1, 12, n, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
do = torch.randn(1, 12, n, 64, device=dev, dtype=dt)
lin = torch.nn.Linear(768, 3 * 768, device=dev, dtype=dt)
x = torch.randn(1, n, 768, device=dev, dtype=dt, requires_grad=True)


def step():
    qq, kk, vv = lin(x).view(1, n, 3, 12, 64).permute(2, 0, 3, 1, 4)
    sparse_attention(qq, kk, vv, pat).float().sum().backward()


cases = {
    "op fwd": lambda: sparse_attention(q.detach(), k.detach(), v.detach(), pat),
    "op fwd+bwd(dO)": lambda: torch.autograd.grad(sparse_attention(q, k, v, pat), (q, k, v), do),
    "(+qkv) step": step,
}


def host_ms(f, calls=30):
    return host_us(f, calls) / 1e3


for name, f in cases.items():
    for _ in range(5):
        f()
    on = sorted(host_ms(f) for _ in range(5))
    gc.disable()
    off = sorted(host_ms(f) for _ in range(5))
    gc.enable()
    P(f"== {name}: host ms per call, gc on {[round(t, 3) for t in on]}, gc off {[round(t, 3) for t in off]}")
for name, f in cases.items():
    torch.cuda._sleep(int(2e9))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(30):
        f()
    pr.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(35)
        P(f"== profile {name} (30 calls) by {key}")
        P(s.getvalue())
