"""Group ``context_parallel``: attention over a sequence sharded across GPUs, on 1, 2, 4, 8 GPUs (those present).

Each world size runs in its own processes (``torch.multiprocessing``, NCCL; gloo and the CPU with ``--smoke``).
Times (``ms``) are wall-clock medians (``time.perf_counter`` around a synchronised step, not ``do_bench``), the
slowest rank's; a step is the attention alone, forward (``fwd``, no grad) or forward and backward with a fixed dO
(``fwd+bwd``); ``maxlen``: a training step of a model. Peak memory is the largest of the ranks'. Shapes: batch 1, 16
heads of 128, bf16.

Sections:

* ``dense``: causal attention, N = 32k, 64k, 128k tokens: attnzoo's ring (``kernel="flex"`` and ``"eager"``, zig-zag
  shards) against PyTorch's ``context_parallel`` (SDPA's fused kernels, its head-tail load balancing); one GPU:
  ``attnzoo.ops.attention``. Tokens/s and the scaling over one GPU.
* ``window``: causal sliding window ±2048, N = 64k, 128k, 256k: the halo exchange (neighbours' 2048 edge keys, then
  ``sparse_attention`` locally) against the full ring (every block travels, tiles outside the band skipped); one
  GPU: ``attnzoo.ops.sparse_attention``.
* ``maxlen``: a Llama (hidden 2048, 16 heads, 4 layers, vocabulary 8192, bf16) trains one step (forward, loss,
  backward) at N = 16k, 32k, ... until it runs out of memory: SDPA on one GPU, ``attnzoo uptrain
  --context-parallel``'s path (ring attention through the transformers attention interface) on N GPUs. A rank
  that runs out of memory mid-ring leaves its peers waiting: the group's 120 s timeout ends the processes and
  the lengths measured until then stand.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import torch

from .measure import Options
from .record import Row

TITLE = "context parallel over 1-8 GPUs: ring vs PyTorch's context_parallel, halo vs ring, longest trained sequence"
SECTIONS = {
    "dense": "causal dense attention, 32k-128k tokens: ring (flex, eager) vs torch context_parallel; tokens/s",
    "window": "causal sliding window ±2048, 64k-256k tokens: halo exchange vs full ring; tokens/s",
    "maxlen": "longest sequence a 4-layer Llama (hidden 2048) trains: 1 GPU (SDPA) vs N GPUs (ring)",
}
PEERS = ()
EXTRA_COLUMNS = ("world", "tokens_per_s", "scaling", "max_len", "failed_at")

__all__ = ["run", "summary", "TITLE", "SECTIONS", "PEERS"]

HEADS, HEAD_DIM, WINDOW = 16, 128, 2048


def _shapes(o: Options) -> dict:
    if o.smoke:
        return {"heads": 2, "head_dim": 16, "window": 8, "dense": (256,), "window_n": (256,), "maxlen": (64, 128)}
    return {
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "window": WINDOW,
        "dense": (32768, 65536, 131072),
        "window_n": (65536, 131072, 262144),
        "maxlen": (16384, 1 << 24),
    }


def _worlds(o: Options) -> list[int]:
    most = torch.cuda.device_count() if o.cuda else 2
    return [w for w in (1, 2, 4, 8) if w <= most]


# ---------------------------------------------------------------------------- inside the worker processes
def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _timed(step, cuda: bool, reps: int) -> tuple[float, float]:
    """(median ms over the ranks' slowest, peak MB over ranks) of ``step``."""
    import torch.distributed as dist

    step()
    _sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(cuda)
        t = time.perf_counter()
        step()
        _sync(cuda)
        times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    stats = torch.tensor([sorted(times)[len(times) // 2], peak], device="cuda" if cuda else "cpu")
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return float(stats[0]), float(stats[1])


def _attention_case(section, name, n, world, rank, shp, dev, dtype):
    """The step of one attention competitor (forward + backward of the attention alone)."""
    from ..ops import attention, sparse_attention
    from ..ops.context_parallel import Sharding, context_parallel_attention, context_parallel_sparse_attention
    from ..ops.sparse import SlidingWindow

    h, d = shp["heads"], shp["head_dim"]
    pattern = SlidingWindow(window=shp["window"], causal=True)
    layout = "zigzag" if section == "dense" else "contiguous"
    s = Sharding(n, world, layout)
    n_local = s.length(rank)
    if name == "torch context_parallel":
        return _torch_cp_case(n, world, h, d, dev, dtype)
    q, k, v, do = (torch.randn(1, h, n_local, d, device=dev, dtype=dtype) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if name == "one GPU":

        def fwd():
            return attention(*leaves, causal=True) if section == "dense" else sparse_attention(*leaves, pattern)
    elif section == "dense":
        kernel = name.split()[-1]

        def fwd():
            return context_parallel_attention(*leaves, s, causal=True, kernel=kernel)
    else:
        method = name.split()[0]

        def fwd():
            return context_parallel_sparse_attention(*leaves, pattern, s, method=method)

    def step():
        torch.autograd.grad(fwd(), leaves, do)

    return {"fwd": _no_grad(fwd), "fwd+bwd": step}, None


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()

    return run


def _torch_cp_case(n, world, h, d, dev, dtype):
    """PyTorch's context parallel: the whole q/k/v as buffers, sharded (head-tail) on entering its context; SDPA
    inside runs the ring. The context is entered here and left by the returned closer."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cuda", (world,))
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(1, h, n, d, device=dev, dtype=dtype, generator=g) for _ in range(4))
    ctx = context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers={q, k, v, do})
    ctx.__enter__()
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def fwd():
        return F.scaled_dot_product_attention(*leaves, is_causal=True)

    def step():
        torch.autograd.grad(fwd(), leaves, do)

    return {"fwd": _no_grad(fwd), "fwd+bwd": step}, lambda: ctx.__exit__(None, None, None)


def _attention_worker(rank, world, port, cuda, jobs, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        for section, name, n, shp, reps in jobs:
            close = None
            try:
                steps, close = _attention_case(section, name, n, world, rank, shp, dev, dtype)
                for mode, step in steps.items():
                    ms, peak = _timed(step, cuda, reps)
                    if rank == 0:
                        results[(section, name, n, world, mode)] = {"ms": ms, "peak_mb": peak}
            except Exception as e:  # every rank fails alike on a check; out of memory may not (see the doc)
                if rank == 0:
                    for mode in ("fwd", "fwd+bwd"):
                        results.setdefault(
                            (section, name, n, world, mode), {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                        )
                if not isinstance(e, (ValueError, TypeError, NotImplementedError, RuntimeError)):
                    traceback.print_exc()
            finally:
                if close is not None:
                    close()
                if cuda:
                    torch.cuda.empty_cache()
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _llama(smoke: bool, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1 << 25,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=8192,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=1 << 25,
        )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=dev, dtype=dtype)


def _maxlen_worker(rank, world, port, cuda, smoke, lengths, results):
    import torch.distributed as dist

    from ..ops.context_parallel import Sharding
    from ..uptrain.context_parallel import sequence_layout, shard_inputs, use_context_parallel_kernel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    model = _llama(smoke, dev, torch.bfloat16 if cuda else torch.float32)
    if world > 1:
        use_context_parallel_kernel(model)
    else:
        model.set_attn_implementation("sdpa")
    layout = sequence_layout(model.config)
    lo, hi = lengths
    n = lo
    try:
        while n <= hi:
            ids = torch.randint(
                0, model.config.vocab_size, (1, n), device=dev, generator=torch.Generator(device=dev).manual_seed(n)
            )

            def step():
                model.zero_grad(set_to_none=True)
                if world > 1:
                    kw = shard_inputs(ids, Sharding(n, world, layout), rank, dist.group.WORLD)
                    logits = model(**kw).logits
                else:
                    logits = model(input_ids=ids, use_cache=False).logits
                logits.float().logsumexp(-1).mean().backward()  # a loss over every position (memory as CE)

            try:
                ms, peak = _timed(step, cuda, 2)
            except torch.OutOfMemoryError:
                results[("maxlen", world, n)] = {"error": "out of memory"}
                raise
            if rank == 0:
                results[("maxlen", world, n)] = {"ms": ms, "peak_mb": peak}
            n *= 2
            if cuda:
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> str:
    """Run ``fn(rank, world, port, *args)`` on ``world`` processes; '' or why they failed."""
    from ..ops.context_parallel.comm import free_port

    import torch.multiprocessing as mp

    try:
        # CPU (smoke): fork, the children inherit the imports; CUDA cannot be forked once initialised
        method = "spawn" if args[0] else "fork"  # every worker's first argument: cuda
        mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method=method)
        return ""
    except Exception as e:  # a rank out of memory, or the group's timeout after it
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"


# ---------------------------------------------------------------------------- the group
def _competitors(section: str, world: int, cuda: bool) -> list[str]:
    if world == 1:
        return ["one GPU"]
    if section == "dense":
        return ["ring flex", "ring eager", "torch context_parallel"] if cuda else ["ring eager"]
    return ["halo", "ring"]


def run(o: Options) -> list[Row]:
    import torch.multiprocessing as mp

    shp = _shapes(o)
    rows: list[Row] = []
    with mp.Manager() as manager:
        results = manager.dict()
        for world in _worlds(o):
            jobs = []
            for section, lengths in (("dense", shp["dense"]), ("window", shp["window_n"])):
                if o.wants(section):
                    jobs += [
                        (section, name, n, shp, 3 if o.smoke else 10)
                        for n in lengths
                        for name in _competitors(section, world, o.cuda)
                    ]
            if jobs:
                o.log(f"context_parallel: {len(jobs)} attention case(s) on {world} process(es)")
                failed = _spawn(_attention_worker, world, o.cuda, jobs, results)
                for mode in ("fwd", "fwd+bwd"):
                    for section, name, n, _, _ in jobs:
                        res = dict(results.get((section, name, n, world, mode), {"error": failed or "not run"}))
                        rows.append(_row(section, name, n, world, res, mode))
            if o.wants("maxlen"):
                import transformers.models.llama.modeling_llama  # noqa: F401  (imported once, before the workers)

                o.log(f"context_parallel: longest trained sequence on {world} process(es)")
                failed = _spawn(_maxlen_worker, world, o.cuda, o.smoke, shp["maxlen"], results)
                done = sorted((key[2], dict(r)) for key, r in results.items() if key[:2] == ("maxlen", world))
                ok = [(n, r) for n, r in done if "error" not in r]
                n_max, best = ok[-1] if ok else (0, {"error": failed or "none trained"})
                label = f"training, {world} GPU(s)" if o.cuda else f"training, {world} process(es)"
                row = _row("maxlen", label, n_max, world, best, "train step")
                row.extra.update(max_len=n_max, failed_at=2 * n_max if failed or len(ok) < len(done) else "-")
                if failed:
                    row.note = failed
                rows.append(row)
    _add_scaling(rows)
    return rows


def _row(section: str, name: str, n: int, world: int, res: dict, mode: str = "fwd+bwd") -> Row:
    name = name if name.startswith("torch") else f"attnzoo {name}"
    if "error" in res:
        return Row(section, name, n, mode, float("nan"), error=res["error"], extra={"world": world})
    ms = res["ms"]
    return Row(
        section,
        name,
        n,
        mode,
        ms,
        peak_mb=res.get("peak_mb"),
        backend=name,
        extra={"world": world, "tokens_per_s": round(n / (ms / 1e3))},
    )


def _add_scaling(rows: list[Row]) -> None:
    """``scaling``: tokens/s over the one-GPU row of the same section and length."""
    base = {
        (r.group, r.n, r.mode): r.extra["tokens_per_s"]
        for r in rows
        if r.ok and r.extra.get("world") == 1 and "tokens_per_s" in r.extra and r.group != "maxlen"
    }
    for r in rows:
        b = base.get((r.group, r.n, r.mode))
        if b and r.ok and "tokens_per_s" in r.extra and r.group != "maxlen":
            r.extra["scaling"] = round(r.extra["tokens_per_s"] / b, 2)


def summary(rows: list[Row], peers: list[Row], out_dir: str | None = None, stem: str = "") -> list[str]:
    """The longest trained sequence per world size, and the best competitor per section and world."""
    from ..table import markdown_table

    lines = []
    ml = [r for r in rows if r.group == "maxlen"]
    if ml:
        lines += [
            "## Longest sequence trained (one step: forward, loss, backward)",
            "",
            markdown_table(
                [
                    {
                        "world": r.extra.get("world"),
                        "max tokens": r.extra.get("max_len"),
                        "failed at": r.extra.get("failed_at"),
                        "step ms": r.ms,
                        "peak MB": r.peak_mb,
                    }
                    for r in ml
                ]
            ),
            "",
        ]
    best = {}
    for r in rows:
        if r.group != "maxlen" and r.ok:
            key = (r.group, r.n, r.mode, r.extra.get("world"))
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    if best:
        lines += [
            "## Fastest per section, length and world size",
            "",
            markdown_table(
                [
                    {
                        "section": g,
                        "n": n,
                        "mode": m,
                        "world": w,
                        "fastest": r.name,
                        "tokens/s": r.extra.get("tokens_per_s"),
                        "scaling": r.extra.get("scaling", "-"),
                    }
                    for (g, n, m, w), r in sorted(best.items())
                ]
            ),
        ]
    return lines
