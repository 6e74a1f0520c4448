"""Context-parallel attention on the CPU: 2 and 4 gloo processes equal the single-process op (float64), forward
and backward, dense and sliding window, causal and not, zigzag and contiguous layouts, odd shard lengths.

One spawn per world size runs every case (a process start costs more than all the cases together); each test
then reads its case's result."""

from __future__ import annotations

import os
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnzoo.ops.context_parallel.comm import free_port
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


MODELS = ("llama", "mistral")  # mistral: every layer a sliding window of 5 keys (window=4): contiguous shards, halo


def _run_model_case(name, rank, world):
    """A tiny HF model through uptrain's context-parallel path (the transformers attention implementation, global
    position_ids, per-rank loss): its logits are the shard's rows of the one-process model's, and the all-reduced
    parameter gradients of the per-rank losses equal the one-process gradient of the mean cross-entropy."""
    import copy

    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from attnzoo.uptrain.context_parallel import sequence_layout, shard_inputs, use_context_parallel_kernel

    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw)).double()
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=5, **kw)).double()
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    ref_logits = ref(input_ids=ids).logits
    F.cross_entropy(ref_logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    use_context_parallel_kernel(model)
    s = Sharding(23, world, sequence_layout(model.config))
    assert s.layout == ("zigzag" if name == "llama" else "contiguous")
    pos = s.positions(rank)
    logits = model(**shard_inputs(ids, s, rank, None)).logits
    torch.testing.assert_close(logits, ref_logits[:, pos], msg=lambda m: f"logits: {m}")
    keep = pos < 22
    ce = F.cross_entropy(logits[:, keep].reshape(-1, 64), ids[:, pos[keep] + 1].reshape(-1), reduction="sum")
    (ce / (2 * 22)).backward()
    for (pname, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, pr.grad, msg=lambda m, pname=pname: f"grad of {pname}: {m}")


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
        for model_name in MODELS:
            try:
                _run_model_case(model_name, rank, world)
                results[(model_name, rank)] = "ok"
            except Exception:
                results[(model_name, rank)] = traceback.format_exc(limit=4)
            dist.barrier()
        if rank == 0:
            results["errors"] = _errors(rank, world)
    finally:
        dist.destroy_process_group()


_RESULTS: dict = {}


def _results(world: int) -> dict:
    if world not in _RESULTS:
        with mp.Manager() as manager:
            shared = manager.dict()
            # fork, not spawn: the children inherit the imported torch and attnzoo (a spawned child spends seconds
            # importing them again); the parent runs one intra-op thread (tests/conftest.py), so forking is safe
            mp.start_processes(
                _worker, args=(world, free_port(), shared), nprocs=world, join=True, start_method="fork"
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
@pytest.mark.parametrize("model", MODELS)
def test_hf_model_through_the_uptrain_path(model, world):
    res = _results(world)
    bad = {r: res.get((model, r), "missing") for r in range(world) if res.get((model, r)) != "ok"}
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


def _tile_masks(bm, nq_tiles, nk_tiles):
    """(partial, full) bool [q_tiles, k_tiles] from a BlockMask's tables."""
    out = []
    for count, index in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        m = torch.zeros(nq_tiles, nk_tiles, dtype=torch.bool)
        for i in range(nq_tiles):
            m[i, index[0, 0, i, : count[0, 0, i]].long()] = True
        out.append(m)
    return out


@pytest.mark.parametrize("band", [(None, 0), (None, None), (-150, 0), (-150, 150), (-3, 3)])
def test_flex_block_mask_tables_are_exact(band):
    """The FlexAttention block kernel's tables (the CPU's eager flex ignores them, so they are checked here): a full
    tile keeps every pair, a skipped tile none, for the zig-zag shards of two ranks."""
    from attnzoo.ops.context_parallel.blocks_flex import _block_mask

    s = Sharding(1000, 2, "zigzag")
    qs, ks = s.spans(0), s.spans(1)
    far = Sharding(1000, 4, "contiguous")
    assert (_block_mask(far.spans(0), far.spans(3), band, "cpu") is None) == (band != (None, None))  # keys after
    bm = _block_mask(qs, ks, band, "cpu")
    qpos, kpos = s.positions(0), s.positions(1)
    d = kpos[None, :] - qpos[:, None]
    keep = torch.ones_like(d, dtype=torch.bool)
    if band[0] is not None:
        keep &= d >= band[0]
    if band[1] is not None:
        keep &= d <= band[1]
    nqt, nkt = -(-len(qpos) // 128), -(-len(kpos) // 128)
    partial, full = _tile_masks(bm, nqt, nkt)
    assert not (partial & full).any()
    for i in range(nqt):
        for j in range(nkt):
            tile = keep[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            if full[i, j]:
                assert tile.all(), (i, j)
            elif not partial[i, j]:
                assert not tile.any(), (i, j)


@pytest.mark.parametrize("band", [(None, 0), (None, None), (-40, 40)])
def test_flex_block_forward_equals_eager(band):
    """The flex block kernel's forward (eager flex on the CPU, float64) merges as the tiled one does."""
    from attnzoo.ops.context_parallel import ring as R

    s = Sharding(300, 2, "zigzag")
    qs, ks = s.spans(0), s.spans(1)
    q = torch.randn(1, 4, s.length(0), 16, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, s.length(1), 16, dtype=torch.float64)
    results = []
    for kernel in ("eager", "flex"):
        out = torch.zeros(1, 4, q.shape[2], 16, dtype=torch.float64)
        lse = torch.full((1, 4, q.shape[2]), float("-inf"), dtype=torch.float64)
        for spans, kk, vv in ((ks, k, v), (qs, q[:, ::2], q[:, 1::2])):
            R._attend(kernel, q, kk, vv, qs, spans, band, 0.25, out, lse, torch.float64)
        results.append((out, lse))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)  # flex's lse is float32


def test_kernel_choice():
    from attnzoo.errors import BackendUnavailableError
    from attnzoo.ops.context_parallel.ring import choose_kernel

    x = torch.zeros(1, 1, 4, 16)
    assert choose_kernel("auto", x) == "eager" and choose_kernel("eager", x) == "eager"
    with pytest.raises(BackendUnavailableError, match="kernel='flex' cannot serve this call: .*CUDA only"):
        choose_kernel("flex", x)


def _dense_flex(q, k, v, bm, scale):
    """A differentiable stand-in for FlexAttention (which has no backward off CUDA): the BlockMask's mask_mod on
    every pair, plain softmax; returns (out, lse) as ``flex_attention(..., return_aux=AuxRequest(lse=True))``."""
    nq, nk = q.shape[2], k.shape[2]
    keep = bm.mask_mod(0, 0, torch.arange(nq)[:, None], torch.arange(nk)[None, :])
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return p @ v, lse


def _simulated_ring(kernel, n, world, layout, causal, window, hq=4, hkv=2, d=16, scale=0.3):
    """Every rank's ring forward and backward in one process (the blocks a real ring passes), against the float64
    reference."""
    from attnzoo.ops.context_parallel import ring as R

    q, do = torch.randn(2, 1, hq, n, d, dtype=torch.float64)
    k, v = torch.randn(2, 1, hkv, n, d, dtype=torch.float64)
    band = (None if window is None else -window, 0 if causal else window)
    s = Sharding(n, world, layout)
    qs, ks, vs, dos = ([s.shard(t, r) for r in range(world)] for t in (q, k, v, do))
    cd = torch.float64
    outs = [torch.zeros(t.shape, dtype=cd) for t in qs]
    lses = [torch.full(t.shape[:-1], float("-inf"), dtype=cd) for t in qs]
    for r in range(world):
        for src in range(world):
            R._attend(kernel, qs[r], ks[src], vs[src], s.spans(r), s.spans(src), band, scale, outs[r], lses[r], cd)
    dq, dk, dv = ([torch.zeros(t.shape, dtype=cd) for t in ts] for ts in (qs, ks, vs))
    for r in range(world):
        delta = (dos[r] * outs[r]).sum(-1)
        for src in range(world):
            spans = (s.spans(r), s.spans(src))
            R._grad(
                kernel,
                qs[r],
                ks[src],
                vs[src],
                dos[r],
                lses[r],
                delta,
                *spans,
                band,
                scale,
                dq[r],
                dk[src],
                dv[src],
                cd,
            )
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    if window is None:
        ref = attention_reference(*ref_in, causal=causal, scale=scale)
    else:
        ref = sparse_attention_reference(*ref_in, SlidingWindow(window=window, causal=causal), scale=scale)
    ref.backward(do)
    torch.testing.assert_close(s.unshard(outs), ref)
    for got, want in zip((dq, dk, dv), ref_in):
        torch.testing.assert_close(s.unshard(got), want.grad)


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 30), (False, 30)])
def test_flex_block_backward_derivation(monkeypatch, causal, window):
    """The flex block kernel's backward (block gradients through FlexAttention's autograd, weighted by the block's
    share of the final log-sum-exp), with FlexAttention replaced by a differentiable dense stand-in: a simulated
    4-rank zig-zag ring equals the float64 reference in output and all three gradients."""
    from attnzoo.ops.context_parallel import blocks_flex

    monkeypatch.setattr(blocks_flex, "_flex", _dense_flex)
    _simulated_ring("flex", 61, 4, "zigzag", causal, window)


@pytest.mark.parametrize(
    "causal,window,layout", [(True, None, "zigzag"), (True, 300, "contiguous"), (False, 300, "zigzag")]
)
def test_eager_kernel_many_tiles(causal, window, layout):
    """Shards longer than a tile (512 queries x 1024 keys): the eager kernel's tiles, skipped, full and masked,
    merge to the reference (a simulated 2-rank ring, float64)."""
    _simulated_ring("eager", 2200, 2, layout, causal, window, hq=2, hkv=1, d=8)
