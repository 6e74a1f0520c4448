"""Group ``reformer``: attnzoo's LSH attention against Hugging Face's ``LSHSelfAttention`` and dense cuDNN.

Shapes follow the peers (``peers_bench.py`` group ``reformer``): hidden 768, 12 heads (head_dim 64), batch 1, bf16,
4 hashes, chunks (``bucket_size``) of 64, ``num_buckets`` from the length (N / 64, as Hugging Face's
``num_buckets=None``). Rows:

* "attnzoo reformer, shared QK (+qk/v proj)": what Hugging Face's module computes: one Linear 768 -> 1536 (the
  shared query-key and the value), the hash (one GEMM + argmax), the sort, the fused chunk kernels, the unsort and
  the rounds combined (:func:`attnzoo.ops.lsh.lsh_attention`);
* "attnzoo reformer, separate QK (+qkv proj)": a converted model's (Linear 768 -> 2304, SMYRF hashing);
* "attnzoo reformer op, kernels, dO given": hash + op on leaf q, v with a fixed dO (no projection, no loss);
* "hf LSHSelfAttention (h4, b64)": transformers' module, built as the peers build it (here too, so the ratio is
  measured in one run; ``--peers`` adds the peers' own rows);
* "dense cuDNN SDPA (+qkv)": exact attention over the whole sequence with the projection.

On CUDA the ``lsh`` section also says where the time goes (group ``lsh-stages``): the shared-QK forward+backward
step run stage by stage (projection + shared keys, hash, sort, the rounds' kernel, combine; delta, the rounds'
backward kernel, the sum over rounds, the projection's backward) between CUDA events, each stage's median over 30
steps, its share of their sum, and for the fused stages an estimate of the bytes they must move
(:func:`stage_bytes`: ``est_mb`` fewest-most) with the bandwidth the fewest imply (``gbps``).

Sections: ``lsh`` (N=16384), ``scaling`` (N = 4k ... 128k: attnzoo shared QK vs dense cuDNN, the crossover). The
summary checks the targets of issue 20: >= 5x faster than HF forward+backward at N=16384, and the length from
which LSH attention beats dense cuDNN.
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from ..ops.lsh import hash_vectors, lsh_attention, num_buckets_for
from ..variants.reformer import ReformerOptions, lsh_buckets, shared_keys
from .measure import Case, Options, measure
from .record import Row

TITLE = "reformer LSH attention (4 hashes, chunks of 64) vs HF LSHSelfAttention and dense cuDNN; scaling to 128k"
SECTIONS = {
    "lsh": "N=16384: attnzoo shared/separate QK (+proj), kernels alone, HF LSHSelfAttention, dense cuDNN",
    "scaling": "attnzoo shared QK vs dense cuDNN from N=4k to 128k (the crossover)",
}
PEERS = ("reformer",)
EXTRA_COLUMNS = ("chunks_read", "share", "est_mb")

__all__ = ["run", "summary", "TITLE", "SECTIONS", "PEERS"]

HID, NH = 768, 12
HD = HID // NH
HASHES, BUCKET = 4, 64
REP_MS = 150


def lsh_flops(n: int, bucket: int = BUCKET, hashes: int = HASHES) -> float:
    """Forward matmul FLOPs of the chunk attention: each round, each query against 2 chunks."""
    return 4.0 * NH * hashes * n * 2 * bucket * HD


def _extra(n: int, bucket: int) -> dict:
    return {"chunks_read": f"{HASHES} x 2 x {bucket}", "num_buckets": num_buckets_for(n, bucket)}


def shared_case(o: Options, n: int, bucket: int = BUCKET) -> Case:
    def make():
        lin = torch.nn.Linear(HID, 2 * HID, bias=False, device=o.device, dtype=o.dtype)
        x = torch.randn(1, n, HID, device=o.device, dtype=o.dtype, requires_grad=True)
        nb = num_buckets_for(n, bucket)

        def f():
            q, v = lin(x).view(1, n, 2, NH, HD).permute(2, 0, 3, 1, 4)
            qb = hash_vectors(q.detach(), HASHES, nb, seed=0)
            return lsh_attention(q, shared_keys(q), v, qb, None, bucket_size=bucket, scale=1.0)
        return f
    return Case("attnzoo reformer, shared QK (+qk/v proj)", make, lsh_flops(n, bucket), _backend(o), _extra(n, bucket))


def separate_case(o: Options, n: int) -> Case:
    opts = ReformerOptions(num_hashes=HASHES, bucket_size=BUCKET)

    def make():
        lin = torch.nn.Linear(HID, 3 * HID, bias=False, device=o.device, dtype=o.dtype)
        x = torch.randn(1, n, HID, device=o.device, dtype=o.dtype, requires_grad=True)
        nb = num_buckets_for(n, BUCKET)

        def f():
            q, k, v = lin(x).view(1, n, 3, NH, HD).permute(2, 0, 3, 1, 4)
            qb, kb = lsh_buckets(opts, q, k, nb, causal=False)
            return lsh_attention(q, k, v, qb, kb, bucket_size=BUCKET)
        return f
    return Case("attnzoo reformer, separate QK (+qkv proj)", make, lsh_flops(n), _backend(o), _extra(n, BUCKET))


def kernels_case(o: Options, n: int) -> Case:
    q, v = (torch.randn(1, NH, n, HD, device=o.device, dtype=o.dtype, requires_grad=True) for _ in range(2))
    nb = num_buckets_for(n, BUCKET)

    def make():
        def f():
            qb = hash_vectors(q.detach(), HASHES, nb, seed=0)
            return lsh_attention(q, shared_keys(q), v, qb, None, bucket_size=BUCKET, scale=1.0)
        return f
    return Case("attnzoo reformer op, kernels, dO given", make, lsh_flops(n), _backend(o), _extra(n, BUCKET),
                grad_of=lambda: (q, v), modes=("fwd+bwd",))


def hf_case(o: Options, n: int) -> Case:
    def make():
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention

        cfg = ReformerConfig(hidden_size=HID, num_attention_heads=NH, attention_head_size=HD,
                             lsh_attn_chunk_length=BUCKET, num_hashes=HASHES, num_buckets=None,
                             max_position_embeddings=n, is_decoder=False, lsh_num_chunks_before=1,
                             lsh_num_chunks_after=0)
        m = LSHSelfAttention(cfg).to(o.device, o.dtype)
        x = torch.randn(1, n, HID, device=o.device, dtype=o.dtype, requires_grad=True)
        return lambda: m(x)[0]
    return Case(f"hf LSHSelfAttention (h{HASHES}, b{BUCKET})", make, lsh_flops(n), "transformers", _extra(n, BUCKET))


def dense_case(o: Options, n: int) -> Case:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = [SDPBackend.CUDNN_ATTENTION] if o.cuda else [SDPBackend.MATH]

    def make():
        lin = torch.nn.Linear(HID, 3 * HID, device=o.device, dtype=o.dtype)
        x = torch.randn(1, n, HID, device=o.device, dtype=o.dtype, requires_grad=True)

        def f():
            q, k, v = lin(x).view(1, n, 3, NH, HD).permute(2, 0, 3, 1, 4)
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v)
        return f
    label = "dense cuDNN SDPA" if o.cuda else "dense SDPA math"
    return Case(f"{label} (+qkv)", make, 4.0 * NH * n * n * HD, be[0].name.lower())


def _backend(o: Options) -> str:
    return "triton" if o.cuda else "torch"


def lsh(o: Options) -> list[Row]:
    n = 256 if o.smoke else 16384
    cases = [shared_case(o, n), separate_case(o, n), kernels_case(o, n), hf_case(o, n), dense_case(o, n)]
    rows = measure(o, "lsh", n, cases, rep_ms=REP_MS)
    if o.cuda:
        try:
            rows += stages(o, n)
        except Exception as e:  # noqa: BLE001 - the breakdown must not hide the section's rows
            rows.append(Row("lsh-stages", "stages", n, "fwd+bwd", float("nan"), error=f"{type(e).__name__}: {e}"))
    return rows


def stage_bytes(n: int, bucket: int = BUCKET, hashes: int = HASHES, heads: int = NH, d: int = HD,
                elem: int = 2) -> dict[str, tuple[float, float]]:
    """(fewest, most) bytes each fused stage of the shared-QK step must move (bf16 rows, float32 statistics):
    fewest if the neighbouring chunk a program re-reads comes from L2, most if from HBM. ``E``: one ``[heads, n, d]``
    tensor. Forward, per round: q, k, v (k, v twice), o_r written; combine: the rounds' o_r read, out written;
    delta: dO, out; backward, per round: q, dO, k, v (each twice: the diagonal block is shared), dQ/dK/dV partials
    written; sum: the partials read, dQ, dK, dV written."""
    e = heads * n * d * elem
    stats = heads * n * 4
    return {"kernel: rounds": (hashes * (4 * e + 2 * stats), hashes * (6 * e + 2 * stats)),
            "combine": (hashes * (e + stats) + e + 2 * stats,) * 2,
            "delta": (2 * e + stats,) * 2,
            "kernel: rounds (bwd)": (hashes * (7 * e + 4 * stats), hashes * (11 * e + 4 * stats)),
            "sum over rounds": (3 * hashes * e + 3 * e,) * 2}


def stages(o: Options, n: int, steps: int = 30) -> list[Row]:
    """Where the time of the shared-QK forward+backward step goes: the step of :func:`shared_case` run stage by
    stage between CUDA events (the op's stages from :mod:`attnzoo.ops.lsh.triton_kernel`), median of ``steps``."""
    from ..ops.lsh import triton_kernel as tk
    from ..ops.lsh.chunked import SHARED
    from ..ops.lsh.op import _perm

    lin = torch.nn.Linear(HID, 2 * HID, bias=False, device=o.device, dtype=o.dtype)
    x = torch.randn(1, n, HID, device=o.device, dtype=o.dtype, requires_grad=True)
    dout = torch.randn(1, NH, n, HD, device=o.device, dtype=o.dtype)
    nb = num_buckets_for(n, BUCKET)
    times: dict[tuple[str, str], list[float]] = {}

    def step(record: bool):
        marks = []

        def mark(key):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            marks.append((key, e))

        mark(None)
        q, v = lin(x).view(1, n, 2, NH, HD).permute(2, 0, 3, 1, 4)
        k = shared_keys(q)
        mark(("fwd", "projection + shared keys"))
        qb = hash_vectors(q.detach(), HASHES, nb, seed=0)
        mark(("fwd", "hash"))
        perm = _perm(qb)
        mark(("fwd", "sort"))
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        o_r, lse_r = tk.fwd_rounds(qd, kd, vd, perm, perm, None, BUCKET, False, SHARED, 1.0)
        mark(("fwd", "kernel: rounds"))
        out, stats = tk.fwd_combine(o_r, lse_r, qd, kd, vd, None, SHARED, 1.0, math.log(HASHES))
        mark(("fwd", "combine"))
        delta = tk.bwd_delta(dout, out)
        mark(("bwd", "delta"))
        parts = tk.bwd_rounds(qd, kd, vd, perm, perm, None, stats, dout, delta, BUCKET, False, SHARED, 1.0,
                              math.log(HASHES))
        mark(("bwd", "kernel: rounds (bwd)"))
        grads = tk.bwd_sum(parts, NH)
        mark(("bwd", "sum over rounds"))
        torch.autograd.backward((q, k, v), grads)
        mark(("bwd", "projection + shared keys"))
        torch.cuda.synchronize()
        if record:
            for (_, a), (key, b) in zip(marks, marks[1:]):
                times.setdefault(key, []).append(a.elapsed_time(b))

    for i in range(steps + 5):
        step(i >= 5)
    med = {key: statistics.median(t) for key, t in times.items()}
    total = sum(med.values())
    est = stage_bytes(n)
    rows = []
    for (mode, name), ms in med.items():
        lo_hi = est.get(name)
        extra = {"share": f"{100 * ms / total:.0f}%"}
        gbps = None
        if lo_hi:
            extra["est_mb"] = f"{lo_hi[0] / 2**20:.0f}-{lo_hi[1] / 2**20:.0f}" if lo_hi[0] != lo_hi[1] else \
                f"{lo_hi[0] / 2**20:.0f}"
            gbps = round(lo_hi[0] / ms / 1e6, 1)
        rows.append(Row("lsh-stages", name, n, mode, round(ms, 4), backend="triton" if lo_hi else "torch",
                        gbps=gbps, extra=extra))
    for mode in ("fwd", "bwd"):
        ms = sum(v for (m, _), v in med.items() if m == mode)
        rows.append(Row("lsh-stages", "sum of the stages", n, mode, round(ms, 4),
                        extra={"share": f"{100 * ms / total:.0f}%"}))
    rows.append(Row("lsh-stages", "sum of the stages", n, "fwd+bwd", round(total, 4), extra={"share": "100%"}))
    for r in rows:
        o.log(f"lsh-stages {r.mode:7s} {r.name:28s} {r.ms:7.3f} ms {r.extra.get('share', ''):>4s} "
              f"{r.extra.get('est_mb', '')}")
    return rows


def scaling(o: Options) -> list[Row]:
    rows: list[Row] = []
    for n in [128, 256] if o.smoke else [4096, 8192, 16384, 32768, 65536, 131072]:
        rows += measure(o, "scaling", n, [shared_case(o, n), dense_case(o, n)], rep_ms=REP_MS)
    return rows


def run(o: Options) -> list[Row]:
    rows: list[Row] = []
    for section, fn in (("lsh", lsh), ("scaling", scaling)):
        if o.wants(section):
            o.log(f"== reformer: {section}")
            rows += fn(o)
    return rows


# ---------------------------------------------------------------------------- summary
def _find(rows: list[Row], group: str, prefix: str, n: int, mode: str) -> Row | None:
    return next((r for r in rows if r.group == group and r.name.startswith(prefix) and r.n == n and r.mode == mode
                 and r.ok), None)


def crossover(rows: list[Row], mode: str) -> tuple[int | None, list[dict]]:
    """(the shortest N of the scaling section from which attnzoo is faster than dense at every longer N, the
    table of ratios)."""
    table, ns = [], sorted({r.n for r in rows if r.group == "scaling"})
    faster = {}
    for n in ns:
        ours, dense = _find(rows, "scaling", "attnzoo", n, mode), _find(rows, "scaling", "dense", n, mode)
        if ours and dense:
            faster[n] = ours.ms < dense.ms
            table.append({"n": n, "mode": mode, "attnzoo ms": ours.ms, "dense ms": dense.ms,
                          "dense / attnzoo": round(dense.ms / ours.ms, 2),
                          "attnzoo peak MB": ours.peak_mb, "dense peak MB": dense.peak_mb})
    cross = None
    for n in reversed(ns):
        if not faster.get(n):
            break
        cross = n
    return cross, table


def summary(rows: list[Row], peers: list[Row], out_dir: str | None = None, stem: str = "reformer") -> list[str]:
    from ..table import markdown_table

    lines: list[str] = ["## targets", ""]
    n = max((r.n for r in rows if r.group == "lsh"), default=0)
    for mode in ("fwd", "fwd+bwd"):
        ours = _find(rows, "lsh", "attnzoo reformer, shared QK", n, mode)
        hf = _find(rows, "lsh", "hf LSHSelfAttention", n, mode)
        peer = next((p for p in peers if p.name.startswith("hf-LSHSelfAttention") and p.n == n and p.mode == mode
                     and p.ok), None)
        for label, other in (("HF LSHSelfAttention (this run)", hf), ("HF LSHSelfAttention (peers script)", peer)):
            if ours and other:
                goal = 5 if mode == "fwd+bwd" else 1
                ok = other.ms / ours.ms >= goal
                lines.append(f"- [{'x' if ok else ' '}] N={n} {mode}: >= {goal}x faster than {label}: "
                             f"{other.ms:.3f} ms / {ours.ms:.3f} ms = {other.ms / ours.ms:.1f}x")
        dense = _find(rows, "lsh", "dense", n, mode)
        if ours and dense:
            lines.append(f"- N={n} {mode}: dense (+qkv) / attnzoo = {dense.ms / ours.ms:.2f}x")
    for mode in ("fwd", "fwd+bwd"):
        cross, table = crossover(rows, mode)
        if table:
            lines += ["", f"## scaling, {mode}", "", markdown_table(table), ""]
            lines.append(f"- [{'x' if cross is not None and cross <= 32768 else ' '}] {mode}: faster than dense "
                         f"cuDNN from N={cross} on (goal: <= 32768)" if cross else
                         f"- [ ] {mode}: not faster than dense cuDNN at any measured N")
    return lines
