"""GPU: the FlexAttention block kernel of the context-parallel ring, forward and backward, against the float64
reference: on one GPU through a simulated ring (every rank's blocks in one process) and a 1-rank NCCL group; on
2+ GPUs, every case of tests/test_context_parallel.py over NCCL (bf16, both block kernels).

Run on a GPU machine: ``python -m pytest -m gpu -q -rs tests/test_context_parallel_gpu.py``. Skipped without CUDA;
the NCCL cases need 2+ GPUs.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnzoo.ops.context_parallel import Sharding, context_parallel_attention, context_parallel_sparse_attention
from attnzoo.ops.context_parallel import ring as R
from attnzoo.ops.context_parallel.comm import free_port
from attnzoo.ops.dense.naive import attention_reference
from attnzoo.ops.sparse import SlidingWindow, sparse_attention_reference

from test_context_parallel import CASES

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _band(causal, window):
    if window is None:
        return (None, 0 if causal else None)
    return (-window, 0 if causal else window)


def _reference(q, k, v, causal, window, scale):
    if window is None:
        return attention_reference(q, k, v, causal=causal, scale=scale)
    return sparse_attention_reference(q, k, v, SlidingWindow(window=window, causal=causal), scale=scale)


def _virtual_ring(q, k, v, do, s: Sharding, band, scale, kernel):
    """Every rank's forward and backward of the ring in one process (the blocks a real ring would pass)."""
    cd = torch.float32
    qs = [s.shard(q, r) for r in range(s.world)]
    ks, vs, dos = ([s.shard(t, r) for r in range(s.world)] for t in (k, v, do))
    outs, lses = [], []
    for r in range(s.world):
        out = torch.zeros(*qs[r].shape[:-1], v.shape[-1], dtype=cd, device=q.device)
        lse = torch.full(qs[r].shape[:-1], float("-inf"), dtype=cd, device=q.device)
        qk = qs[r].contiguous() if kernel == "flex" else qs[r].to(cd)
        for src in range(s.world):
            R._attend(kernel, qk, ks[src], vs[src], s.spans(r), s.spans(src), band, scale, out, lse, cd)
        outs.append(out)
        lses.append(lse)
    dq = [torch.zeros(t.shape, dtype=cd, device=q.device) for t in qs]
    dk = [torch.zeros(t.shape, dtype=cd, device=q.device) for t in ks]
    dv = [torch.zeros(t.shape, dtype=cd, device=q.device) for t in vs]
    for r in range(s.world):
        qk = qs[r].contiguous() if kernel == "flex" else qs[r].to(cd)
        do_r = dos[r].contiguous() if kernel == "flex" else dos[r].to(cd)
        delta = (dos[r].to(cd) * outs[r]).sum(-1)
        for src in range(s.world):
            R._grad(
                kernel,
                qk,
                ks[src],
                vs[src],
                do_r,
                lses[r],
                delta,
                s.spans(r),
                s.spans(src),
                band,
                scale,
                dq[r],
                dk[src],
                dv[src],
                cd,
            )
    return s.unshard(outs), s.unshard(dq), s.unshard(dk), s.unshard(dv)


@pytest.mark.parametrize("kernel", ["flex", "eager"])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 100), (False, 100)])
@pytest.mark.parametrize("world,layout", [(4, "zigzag"), (3, "contiguous")])
def test_simulated_ring_bf16(kernel, causal, window, world, layout):
    b, hq, hkv, n, d = 2, 8, 4, 1111, 64
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
    s = Sharding(n, world, layout)
    out, dq, dk, dv = _virtual_ring(q, k, v, do, s, _band(causal, window), 0.125, kernel)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_in, causal, window, 0.125)
    ref.backward(do.double())
    assert _rel(out, ref) < 1e-2
    for got, want in zip((dq, dk, dv), ref_in):
        assert _rel(got, want.grad) < 2e-2


def _one_rank_group():
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)


@pytest.mark.parametrize("causal", [True, False])
def test_one_rank_ring_flex_equals_reference(causal):
    _one_rank_group()
    q, k, v = (torch.randn(1, 4, 777, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    s = Sharding(777, 1, "zigzag")
    out = context_parallel_attention(q, k, v, s, causal=causal, kernel="flex")
    do = torch.randn_like(out)
    out.backward(do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, causal=causal)
    ref.backward(do.double())
    assert _rel(out, ref) < 1e-2
    for t, r in zip((q, k, v), ref_in):
        assert _rel(t.grad, r.grad) < 2e-2


def _nccl_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        for name, kind, n, layout, causal, window, method, hq, hkv in CASES:
            for kernel in ("flex", "eager"):
                try:
                    n_gpu = n * 37  # long enough for several 128-tiles per shard
                    g = torch.Generator(device="cuda").manual_seed(1)
                    q, do = (torch.randn(2, hq, n_gpu, 32, device="cuda", generator=g) for _ in range(2))
                    k, v = (torch.randn(2, hkv, n_gpu, 32, device="cuda", generator=g) for _ in range(2))
                    q, k, v, do = (t.bfloat16() for t in (q, k, v, do))
                    w = None if window is None else window * 20
                    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
                    ref = _reference(*ref_in, causal, w, 0.2)
                    ref.backward(do.double())
                    s = Sharding(n_gpu, world, layout)
                    local = [s.shard(t, rank).detach().requires_grad_() for t in (q, k, v)]
                    if kind == "dense":
                        out = context_parallel_attention(*local, s, causal=causal, scale=0.2, kernel=kernel)
                    else:
                        out = context_parallel_sparse_attention(
                            *local, SlidingWindow(window=w, causal=causal), s, scale=0.2, method=method, kernel=kernel
                        )
                    out.backward(s.shard(do, rank))
                    errs = [_rel(out, s.shard(ref, rank))] + [
                        _rel(t.grad, s.shard(r.grad, rank)) for t, r in zip(local, ref_in)
                    ]
                    results[(name, kernel, rank)] = "ok" if max(errs) < 2e-2 else f"relative errors {errs}"
                except Exception:
                    results[(name, kernel, rank)] = traceback.format_exc(limit=4)
                dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ GPUs")
def test_nccl_cases_equal_reference():
    world = min(torch.cuda.device_count(), 4)
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_nccl_worker, args=(world, free_port(), shared), nprocs=world, join=True)
        res = dict(shared)
    bad = {k: v for k, v in res.items() if v != "ok"}
    assert len(res) == len(CASES) * 2 * world and not bad, bad
