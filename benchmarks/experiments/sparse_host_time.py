"""Host time per call of the sliding-window op and of compiled FlexAttention (±256, N=16384, 12 heads, d=64, bf16):
the GPU is kept busy with a long sleep kernel so the host never waits, then 50 calls are timed on the host clock,
and the op is profiled with cProfile. The record behind docs/sparse.md's host-time line. Run from the repo root on a
GPU machine; writes $OUT/host2.txt."""
import os, sys, time, cProfile, pstats, io
sys.path.insert(0, os.getcwd())
import torch
from attnzoo.ops import sparse_attention
from attnzoo.ops.sparse import SlidingWindow
OUT = os.environ.get("OUT", ".")
log = open(os.path.join(OUT, "host2.txt"), "w")
def P(*a):
    s = " ".join(str(x) for x in a); print(s, flush=True); log.write(s + "\n"); log.flush()
dev, dt = "cuda", torch.bfloat16
pat = SlidingWindow(window=256)
q, k, v = (torch.randn(1, 12, 16384, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
do = torch.randn(1, 12, 16384, 64, device=dev, dtype=dt)
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
flex = torch.compile(flex_attention, dynamic=False)
bm = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= 256, None, None, 16384, 16384, device=dev)
cases = {
    "ours fwd": lambda: sparse_attention(q.detach(), k.detach(), v.detach(), pat),
    "ours fwd+bwd(dO)": lambda: torch.autograd.grad(sparse_attention(q, k, v, pat), (q, k, v), do),
    "flex fwd": lambda: flex(q.detach(), k.detach(), v.detach(), block_mask=bm),
    "flex fwd+bwd(dO)": lambda: torch.autograd.grad(flex(q, k, v, block_mask=bm), (q, k, v), do),
}
for name, f in cases.items():
    for _ in range(5): f()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))  # keep the GPU busy: the host never waits
    t = time.perf_counter()
    for _ in range(50): f()
    el = (time.perf_counter() - t) / 50 * 1e3
    torch.cuda.synchronize()
    P(f"== {name}: host {el:.3f} ms per call")
for name in ("ours fwd+bwd(dO)", "ours fwd"):
    f = cases[name]
    torch.cuda._sleep(int(3e9))
    pr = cProfile.Profile(); pr.enable()
    for _ in range(50): f()
    pr.disable(); torch.cuda.synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    P(f"== profile {name} (50 calls)"); P(s.getvalue())
