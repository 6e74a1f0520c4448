"""Context-parallel attention on the CPU: 2 and 4 gloo processes equal the single-process op (float64), forward
and backward, dense and sliding window, causal and not, zigzag and contiguous layouts, odd shard lengths.

One spawn per world size runs every case (a process start costs more than all the cases together); each test
then reads its case's result."""

from __future__ import annotations

import os
import socket
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnzoo.ops.context_parallel import Sharding, context_parallel_attention, context_parallel_sparse_attention
from attnzoo.ops.dense.naive import attention_reference
from attnzoo.ops.sparse import SlidingWindow, sparse_attention_reference

# (name, kind, seq_len, layout, causal, window, method, q_heads, kv_heads)
CASES = [
    ("dense-causal-zigzag", "dense", 24, "zigzag", True, None, None, 4, 2),
    ("dense-causal-contiguous", "dense", 24, "contiguous", True, None, None, 2, 2),
    ("dense-bidir-zigzag", "dense", 24, "zigzag", False, None, None, 2, 1),
    ("dense-bidir-contiguous", "dense", 24, "contiguous", False, None, None, 2, 2),
    ("dense-causal-zigzag-odd", "dense", 29, "zigzag", True, None, None, 2, 2),
    ("dense-bidir-contiguous-odd", "dense", 23, "contiguous", False, None, None, 2, 2),
    ("window-causal-halo", "window", 26, "contiguous", True, 3, "halo", 4, 2),
    ("window-bidir-halo", "window", 26, "contiguous", False, 3, "halo", 2, 2),
    ("window-causal-halo-odd", "window", 27, "contiguous", True, 5, "halo", 2, 1),
    ("window-bidir-ring-zigzag", "window", 27, "zigzag", False, 4, "ring", 2, 2),
    ("window-causal-ring-contiguous", "window", 26, "contiguous", True, 7, "ring", 2, 2),
]
WORLDS = (2, 4)


def _inputs(seq_len, hq, hkv, seed):
    g = torch.Generator().manual_seed(seed)
    b, d, dv = 2, 8, 6
    q = torch.randn(b, hq, seq_len, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, seq_len, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, seq_len, dv, generator=g, dtype=torch.float64)
    do = torch.randn(b, hq, seq_len, dv, generator=g, dtype=torch.float64)
    return q, k, v, do


def _run_case(case, rank, world):
    name, kind, n, layout, causal, window, method, hq, hkv = case
    q, k, v, do = _inputs(n, hq, hkv, seed=zlib.crc32(name.encode()))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    if kind == "dense":
        ref = attention_reference(*ref_in, causal=causal, scale=0.3)
    else:
        ref = sparse_attention_reference(*ref_in, SlidingWindow(window=window, causal=causal), scale=0.3)
    ref.backward(do)
    s = Sharding(n, world, layout)
    local = [s.shard(t, rank).requires_grad_() for t in (q, k, v)]
    if kind == "dense":
        out = context_parallel_attention(*local, s, causal=causal, scale=0.3)
    else:
        out = context_parallel_sparse_attention(
            *local, SlidingWindow(window=window, causal=causal), s, scale=0.3, method=method
        )
    out.backward(s.shard(do, rank))
    torch.testing.assert_close(out, s.shard(ref, rank), rtol=1e-10, atol=1e-10, msg=lambda m: f"output: {m}")
    for label, t, r in zip("qkv", local, ref_in):
        torch.testing.assert_close(
            t.grad, s.shard(r.grad, rank), rtol=1e-10, atol=1e-10, msg=lambda m, label=label: f"d{label}: {m}"
        )


def _errors(rank, world):
    """What the op's checks say, the same on every rank (no communication happens before them)."""
    s = Sharding(8, world, "zigzag")
    x = torch.zeros(1, 1, s.length(rank), 4, dtype=torch.float64)
    c = Sharding(8, world, "contiguous")
    out = {}
    for key, call in {
        "halo-zigzag": lambda: context_parallel_sparse_attention(x, x, x, SlidingWindow(window=1), s),
        "halo-wide": lambda: context_parallel_sparse_attention(x, x, x, SlidingWindow(window=5), c),
        "wrong-length": lambda: context_parallel_attention(x[:, :, :1], x[:, :, :1], x[:, :, :1], s),
    }.items():
        try:
            call()
            out[key] = "no error"
        except (ValueError, TypeError) as e:
            out[key] = str(e)
    return out


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in CASES:
            try:
                _run_case(case, rank, world)
                results[(case[0], rank)] = "ok"
            except Exception:
                results[(case[0], rank)] = traceback.format_exc(limit=4)
            dist.barrier()
        if rank == 0:
            results["errors"] = _errors(rank, world)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RESULTS: dict = {}


def _results(world: int) -> dict:
    if world not in _RESULTS:
        with mp.Manager() as manager:
            shared = manager.dict()
            # fork, not spawn: the children inherit the imported torch and attnzoo (a spawned child spends seconds
            # importing them again); the parent runs one intra-op thread (tests/conftest.py), so forking is safe
            mp.start_processes(
                _worker, args=(world, _free_port(), shared), nprocs=world, join=True, start_method="fork"
            )
            _RESULTS[world] = dict(shared)
    return _RESULTS[world]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_equals_single_process(case, world):
    res = _results(world)
    bad = {r: res.get((case, r), "missing") for r in range(world) if res.get((case, r)) != "ok"}
    assert not bad, "\n".join(f"rank {r}: {msg}" for r, msg in bad.items())


@pytest.mark.parametrize("world", WORLDS)
def test_errors_name_option_and_value(world):
    errors = _results(world)["errors"]
    assert "method='halo' needs Sharding(layout='contiguous')" in errors["halo-zigzag"]
    assert "window=5 is wider than the shortest shard" in errors["halo-wide"]
    assert "pass each rank's shard" in errors["wrong-length"]


def test_sharding_layouts():
    s = Sharding(10, 2, "zigzag")
    assert s.spans(0) == ((0, 3), (8, 10)) and s.spans(1) == ((3, 6), (6, 8))
    x = torch.arange(10.0).view(1, 1, 10, 1)
    for layout in ("zigzag", "contiguous"):
        for world in (1, 2, 3):
            s = Sharding(10, world, layout)
            parts = [s.shard(x, r) for r in range(world)]
            assert torch.equal(s.unshard(parts), x)
            assert torch.equal(torch.cat([s.positions(r) for r in range(world)]).sort().values, torch.arange(10))
    with pytest.raises(ValueError, match="layout='ring'.*expected one of 'zigzag', 'contiguous'"):
        Sharding(10, 2, "ring")
    with pytest.raises(ValueError, match="seq_len=5: layout='zigzag' over world=3 ranks cuts the sequence into 6"):
        Sharding(5, 3, "zigzag")
