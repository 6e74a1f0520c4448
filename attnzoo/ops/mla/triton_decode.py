"""MLA's absorbed decode as a split-KV Triton kernel (flash-decoding over the latent cache).

One new token per sequence. The cached sequence is cut into ``splits`` contiguous pieces; one program takes a
tile of ``block_h`` query heads (heads that share one rope key), one piece and one part of the value columns
(``value_split``), streams its latents ``c`` and rope keys (``[BLOCK_N, R]`` and ``[BLOCK_N, Dr]`` tiles, read in
place from the cache's own strides), and keeps an online softmax: scores ``q_lat · c + q_rope · k_rope`` (one dot
of width ``R`` and one of ``Dr``: the ``[c; k_rope]`` concatenation is never built), output ``Σ p c`` (the latent
is the value). Each program writes its piece's normalised output and base-2 log-sum-exp; a second kernel combines
the pieces per head. With one piece the first kernel writes the output itself.

**Variants** (:class:`DecodeConfig`):

* ``value_split=1``: one program accumulates all ``R`` value columns of its heads (``[block_h, R]`` float32: 128
  registers a thread for 64 heads x 512 at 8 warps);
* ``value_split=2``: two programs share a (head tile, piece) and each accumulates half of the value columns
  (FlashMLA gives each of its two warpgroups half of the 512 columns; here they are two programs). Each reads the
  latent tile as two column halves (its own: score and values; the other's: score only) and still scores the
  whole ``R + Dr`` width, so the score FLOPs double (the second program of a pair gets the tile from L2); in
  exchange the accumulator halves (64 registers a thread at 8 warps) and twice as many programs hide the memory
  latency.

The programs of one piece's head tiles and value parts are launched next to each other, so the cache tile they
all read is fetched from memory once and served from L2 to the others.

**Which configuration runs** (:func:`plan`): a :class:`DecodeConfig` given with every kernel field set runs as
given (tests, the sweep). Otherwise, in this order: the tuned table shipped with attnzoo
(``decode_configs.json`` beside this file, written by ``benchmarks/mla_decode_sweep.py --write-table`` from a GPU
run: the best configuration per card, shape family and dtype), then the configuration tuned in this process on the
first eager call of a shape family (the candidates of :func:`candidates` timed with ``triton.testing.do_bench``:
never inside a CUDA-graph capture or a ``torch.compile`` trace, which take the heuristic instead), then the
heuristic (:func:`choose_config`). ``splits`` always comes from the shapes alone (:func:`choose_splits`): at
least ``programs_per_sm`` programs per SM where the sequence is long enough, capped so that the partial outputs
stay a small fraction of the cache bytes. Nothing here reads a tensor's values on the host: a call can be
captured in a CUDA graph once its shape family was seen eagerly.

Partial outputs are stored in the input dtype for half inputs (they are normalised averages of cached values: the
range of ``c``; rounding them costs what rounding the final output costs) and in float32 for float32 inputs;
log-sum-exps in float32. Float32 inputs take IEEE float32 dots unless torch allows TF32
(``torch.backends.cuda.matmul.allow_tf32``). Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
(tests/test_mla_decode.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from ..sparse.triton_kernel import available as _triton_available
from ..sparse.triton_kernel import interpreted
from ..custom_ops import kernel_op

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: attnzoo works without Triton
    triton = None

__all__ = ["DecodeConfig", "choose_config", "choose_splits", "candidates", "plan", "latent_decode",
           "unavailable_reason", "interpreted", "device_key", "TABLE_PATH", "load_table", "table_entry",
           "PROGRAMS_PER_SM", "config_dict", "last_plan"]

#: the split heuristic's default target: programs per SM (one program per SM leaves no latency hiding)
PROGRAMS_PER_SM = 3.0
#: the tuned table (a list of sweep winners), read once per process
TABLE_PATH = Path(__file__).with_name("decode_configs.json")
_KERNEL_FIELDS = ("block_h", "block_n", "num_warps", "num_stages", "value_split")


@dataclass(frozen=True)
class DecodeConfig:
    """Launch settings of the decode kernel (None: :func:`plan` decides).

    ``value_split``: 1 (one program per head tile and piece accumulates all ``kv_rank`` value columns) or 2 (two
    programs, half the columns each). ``programs_per_sm``: the split heuristic's target when ``splits`` is None."""

    block_h: int | None = None
    block_n: int | None = None
    splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    value_split: int | None = None
    programs_per_sm: float | None = None

    def kernel_fields_set(self) -> bool:
        """Whether every field of the kernel's own configuration is given (then it runs as given)."""
        return all(getattr(self, f) is not None for f in _KERNEL_FIELDS)

    def filled_from(self, other: DecodeConfig) -> DecodeConfig:
        """This config with its None fields taken from ``other``."""
        return DecodeConfig(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                               else getattr(other, f.name) for f in fields(self)})

    def kernel_dict(self) -> dict:
        return {f: getattr(self, f) for f in _KERNEL_FIELDS}


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


_DEVICES: dict = {}


def device_key(device: torch.device) -> tuple[str, str, int]:
    """``(name, arch, SMs)`` of a device, e.g. ``("NVIDIA H100 80GB HBM3", "sm90", 132)``; asked once per device
    (host-side properties: no sync). Off CUDA: ``("cpu", "cpu", 4)`` (4 "SMs" for the interpreter's tests)."""
    if device.type != "cuda":
        return ("cpu", "cpu", 4)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICES:
        p = torch.cuda.get_device_properties(idx)
        _DEVICES[idx] = (p.name, f"sm{p.major}{p.minor}", int(p.multi_processor_count))
    return _DEVICES[idx]


def _partial_elem(elem: int) -> int:
    return 4 if elem >= 4 else elem


def choose_splits(batch: int, heads: int, rope_heads: int, k_len: int, kv_rank: int, rope_dim: int, elem: int,
                  block_h: int, block_n: int, value_split: int, sms: int,
                  programs_per_sm: float | None = None, traffic_cap: bool = True) -> int:
    """The split count for a shape (from shapes alone). The smallest count that gives ``programs_per_sm``
    programs per SM (``batch · rope_heads · head tiles · value_split · splits``), and no more than: pieces of at
    least ``max(256, 4 · block_n)`` keys; partial outputs (``heads · kv_rank`` numbers per piece and sequence,
    written and read back) under 1/8 of the cache bytes read (``traffic_cap``); 64."""
    pps = PROGRAMS_PER_SM if programs_per_sm is None else float(programs_per_sm)
    group = heads // rope_heads
    programs = batch * rope_heads * -(-group // block_h) * value_split
    want = max(1, math.ceil(pps * sms / programs - 1e-9))
    by_len = max(1, k_len // max(256, 4 * block_n))
    splits = min(want, by_len, 64)
    if traffic_cap:
        per_token = (kv_rank + rope_heads * rope_dim) * elem
        partial = 2 * heads * kv_rank * _partial_elem(elem)
        splits = min(splits, max(1, (k_len * per_token) // (8 * partial)))
    return max(1, splits)


def choose_config(batch: int, heads: int, rope_heads: int, k_len: int, kv_rank: int, rope_dim: int,
                  elem: int, device: torch.device, given: DecodeConfig | None = None) -> DecodeConfig:
    """The heuristic configuration, with what ``given`` sets kept: 64-head tiles of 32 keys at 8 warps for a wide
    latent (``kv_rank >= 256``), 32-head tiles of 64 keys at 4 warps otherwise (head tiles never wider than the
    group, at least 16: ``tl.dot``'s minimum), 2 stages, one value part, and :func:`choose_splits`."""
    g = given or DecodeConfig()
    group = heads // rope_heads
    big = kv_rank >= 256
    block_h = g.block_h or min(64 if big else 32, _pow2(group))
    block_n = g.block_n or (32 if big else 64)
    num_warps = g.num_warps or (8 if big else 4)
    num_stages = g.num_stages or 2
    value_split = g.value_split or 1
    splits = g.splits
    if splits is None:
        splits = choose_splits(batch, heads, rope_heads, k_len, kv_rank, rope_dim, elem, block_h, block_n,
                               value_split, device_key(device)[2], g.programs_per_sm)
    return DecodeConfig(block_h, block_n, splits, num_warps, num_stages, value_split, g.programs_per_sm)


# ---------------------------------------------------------------------------------------------- the tuned table
_TABLE: dict = {}


def load_table(path: Path | str | None = None) -> list[dict]:
    """The entries of the tuned table (``decode_configs.json``; an absent or empty file: none). Each entry:
    ``device`` (name), ``arch`` (``sm90``), ``group`` (query heads per rope key), ``kv_rank``, ``rope_dim``,
    ``dtype``, ``batch``, ``k_len`` (where it was measured), ``config`` (the :class:`DecodeConfig` fields,
    ``splits`` included) and what it reached (``gbps``, ``pct_of_copy``)."""
    p = Path(path) if path is not None else TABLE_PATH
    key = str(p)
    if key not in _TABLE:
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            data = {}
        entries = data.get("entries", []) if isinstance(data, dict) else []
        _TABLE[key] = [e for e in entries if isinstance(e, dict) and isinstance(e.get("config"), dict)]
    return _TABLE[key]


def table_entry(device: torch.device, group: int, kv_rank: int, rope_dim: int, dtype: torch.dtype, batch: int,
                k_len: int, entries: list[dict] | None = None) -> dict | None:
    """The table entry for a call: same group, widths and dtype, on the same card (by name) or else the same
    architecture, the nearest in (batch, k_len) on a log scale; None where the table holds none."""
    name, arch, _ = device_key(device)
    entries = load_table() if entries is None else entries
    dt = str(dtype).replace("torch.", "")
    fits = [e for e in entries if (e.get("group"), e.get("kv_rank"), e.get("rope_dim"), e.get("dtype")) ==
            (group, kv_rank, rope_dim, dt) and e.get("arch") == arch]
    if not fits:
        return None
    same = [e for e in fits if e.get("device") == name]
    fits = same or fits

    def distance(e):
        return abs(math.log2(max(1, e["batch"]) / max(1, batch))) + abs(math.log2(max(1, e["k_len"]) / max(1, k_len)))
    return min(fits, key=distance)


def _from_entry(entry: dict, batch: int, heads: int, rope_heads: int, k_len: int, kv_rank: int, rope_dim: int,
                elem: int, sms: int) -> DecodeConfig:
    """An entry's kernel configuration; its split count where the call has the entry's shape, else the count that
    gives the entry's programs per SM (the measured winner's occupancy, without the traffic cap)."""
    c = entry["config"]
    cfg = DecodeConfig(**{k: c[k] for k in _KERNEL_FIELDS})
    if entry.get("batch") == batch and entry.get("k_len") == k_len and c.get("splits"):
        return replace(cfg, splits=int(c["splits"]))
    group = heads // rope_heads
    e_rh = int(entry.get("rope_heads", rope_heads))
    programs = entry["batch"] * e_rh * -(-group // cfg.block_h) * cfg.value_split * int(c.get("splits", 1))
    pps = programs / sms
    splits = choose_splits(batch, heads, rope_heads, k_len, kv_rank, rope_dim, elem, cfg.block_h, cfg.block_n,
                           cfg.value_split, sms, pps, traffic_cap=False)
    return replace(cfg, splits=splits, programs_per_sm=pps)


# ---------------------------------------------------------------------------------------------- first-call tuning
#: (BLOCK_H, BLOCK_N, warps, stages, value_split) tried on the first eager call of a shape family without a table
#: entry, the heuristic's first; ``benchmarks/mla_decode_sweep.py`` tries a wider space
_CANDIDATES_WIDE = [(64, 32, 8, 2, 1), (64, 32, 4, 2, 2), (64, 64, 8, 2, 2), (64, 16, 4, 3, 1), (64, 64, 8, 2, 1),
                    (32, 64, 4, 2, 1), (64, 32, 8, 3, 2), (32, 32, 4, 3, 2)]
_CANDIDATES_NARROW = [(32, 64, 4, 2, 1), (32, 32, 4, 3, 1), (64, 64, 8, 2, 1), (16, 64, 4, 2, 1), (16, 32, 4, 3, 1)]
_tuned: dict = {}  # shape family -> DecodeConfig (kernel fields only) tuned in this process
#: calls smaller than this (batch x cached tokens) run the heuristic untuned: too short to time meaningfully
TUNE_MIN_TOKENS = 1 << 15


def candidates(heads: int, rope_heads: int, kv_rank: int) -> list[DecodeConfig]:
    """The kernel configurations the first-call tuner times (head tiles no wider than the group, at least 16)."""
    group = heads // rope_heads
    widest = _pow2(group)
    base = _CANDIDATES_WIDE if kv_rank >= 256 else _CANDIDATES_NARROW
    out, seen = [], set()
    for bh, bn, w, st, vs in base:
        bh = min(bh, widest)
        if (bh, bn, w, st, vs) not in seen:
            seen.add((bh, bn, w, st, vs))
            out.append(DecodeConfig(block_h=bh, block_n=bn, num_warps=w, num_stages=st, value_split=vs))
    return out


def _family(device, heads, rope_heads, kv_rank, rope_dim, dtype, has_kpm) -> tuple:
    return (device_key(device), heads, rope_heads, kv_rank, rope_dim, dtype, has_kpm)


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def plan(q_lat: torch.Tensor, c: torch.Tensor, rope_heads: int, rope_dim: int, has_kpm: bool,
         given: DecodeConfig | None = None) -> tuple[DecodeConfig, str]:
    """The configuration a call runs and where it came from (``"given"``, ``"table"``, ``"tuned"``,
    ``"heuristic"``). Reads shapes, dtypes and device properties only; remembered per shape (a static cache's
    decode steps, all of one length, plan once)."""
    b, heads, _, r = q_lat.shape
    k_len, elem, dev = c.shape[1], c.element_size(), c.device
    given = given or DecodeConfig()
    key = (dev, b, heads, rope_heads, k_len, r, rope_dim, c.dtype, has_kpm, given)
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    found = _plan(b, heads, rope_heads, k_len, r, rope_dim, elem, dev, c.dtype, has_kpm, given)
    if found[1] != "heuristic" or dev.type != "cuda" or interpreted():  # a heuristic choice may be tuned later
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        _PLANS[key] = found
    return found


_PLANS: dict = {}  # (device, shapes, dtype, padding, given) -> (config, source): the plan of each shape, once


def _plan(b, heads, rope_heads, k_len, r, rope_dim, elem, dev, dtype, has_kpm, given):
    sms = device_key(dev)[2]
    if given.kernel_fields_set() or interpreted() or dev.type != "cuda":
        return choose_config(b, heads, rope_heads, k_len, r, rope_dim, elem, dev, given), "given" if \
            given.kernel_fields_set() else "heuristic"
    group = heads // rope_heads
    entry = table_entry(dev, group, r, rope_dim, dtype, b, k_len)
    if entry is not None:
        cfg = _from_entry(entry, b, heads, rope_heads, k_len, r, rope_dim, elem, sms)
        return given.filled_from(cfg) if given != DecodeConfig() else cfg, "table"
    fam = _family(dev, heads, rope_heads, r, rope_dim, dtype, has_kpm)
    tuned = _tuned.get(fam)
    if tuned is not None:
        return choose_config(b, heads, rope_heads, k_len, r, rope_dim, elem, dev, given.filled_from(tuned)), "tuned"
    return choose_config(b, heads, rope_heads, k_len, r, rope_dim, elem, dev, given), "heuristic"


def _tune(fam, run, q_lat, c, rope_heads, rope_dim, given) -> DecodeConfig | None:
    """Time :func:`candidates` (each with its own split count) on this call's inputs; keep the fastest for the
    shape family. ``run(cfg)`` launches one configuration."""
    from triton.testing import do_bench

    b, heads, _, r = q_lat.shape
    best = None
    for cand in candidates(heads, rope_heads, r):
        cfg = choose_config(b, heads, rope_heads, c.shape[1], r, rope_dim, c.element_size(), c.device,
                            given.filled_from(cand) if given is not None else cand)
        try:
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 - a configuration that does not compile here (resources): not a candidate
            continue
        if best is None or ms < best[0]:
            best = (ms, cand)
    if best is not None:
        _tuned[fam] = best[1]
    return best[1] if best is not None else None


def unavailable_reason(call) -> str | None:
    """Why the kernel cannot serve a :class:`~attnzoo.ops.mla.call.LatentCall`, or None."""
    why = _triton_available(call.q_lat.device.type)
    if why:
        return why
    if call.q_len != 1:
        return f"decodes one query token, got q_len={call.q_len}"
    if call.needs_grad:
        return "has no backward (decode only): inputs require grad"
    if call.mask is not None and (call.mask.shape[1] != 1 or call.mask.shape[2] != 1):
        return "takes key padding (or a [batch, 1, 1, k_len] mask), not a per-head mask"
    if call.q_lat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16/bfloat16/float32, inputs are {call.q_lat.dtype}"
    if call.rope_dim > 256 or call.kv_rank > 1024:
        return f"takes kv_rank <= 1024 and rope_dim <= 256, got {call.kv_rank} and {call.rope_dim}"
    return None


if triton is not None:

    # lengths and the split count change from call to call (every decode step): one compiled kernel serves them all
    @triton.jit(do_not_specialize=["k_len", "split_len", "splits"])
    def _split_kernel(QL, QR, C, KR, KPM, PO, PL, O,
                      s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_cn, s_kb, s_kn, s_kg, s_mb, s_ob, s_oh,
                      k_len, split_len, splits, scale_log2,
                      HEADS: tl.constexpr, GROUP: tl.constexpr, ROPE_HEADS: tl.constexpr, R: tl.constexpr,
                      DR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_V: tl.constexpr,
                      VSPLIT: tl.constexpr, ONE_SPLIT: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr,
                      UPCAST: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
        TILES = (GROUP + BLOCK_H - 1) // BLOCK_H
        pid = tl.program_id(0)
        t = pid % TILES  # head tiles and value parts of one piece run side by side (they read the same cache tiles)
        rest = pid // TILES
        vp = rest % VSPLIT
        rest = rest // VSPLIT
        sp = rest % splits
        rest = rest // splits
        g = rest % ROPE_HEADS
        b = (rest // ROPE_HEADS).to(tl.int64)  # batch offsets of a long cache pass 2**31 elements
        hh = t * BLOCK_H + tl.arange(0, BLOCK_H)  # head within the group
        h_ok = hh < GROUP
        heads = g * GROUP + hh
        rr = tl.arange(0, BLOCK_R)
        dd = tl.arange(0, BLOCK_DR)
        nn = tl.arange(0, BLOCK_N)
        vv = vp * BLOCK_V + tl.arange(0, BLOCK_V)  # this program's value columns
        vo = (1 - vp) * BLOCK_V + tl.arange(0, BLOCK_V)  # the other part's (value_split=2)
        q_base = QL + b * s_qlb + heads[:, None] * s_qlh
        if VSPLIT == 1:
            ql = tl.load(q_base + rr[None, :], mask=h_ok[:, None] & (rr[None, :] < R), other=0.0)
        else:  # the query in two halves: this program's value columns and the other part's
            ql = tl.load(q_base + vv[None, :], mask=h_ok[:, None] & (vv[None, :] < R), other=0.0)
            qo = tl.load(q_base + vo[None, :], mask=h_ok[:, None] & (vo[None, :] < R), other=0.0)
            if UPCAST:
                qo = qo.to(tl.float32)
        qr = tl.load(QR + b * s_qrb + heads[:, None] * s_qrh + dd[None, :], mask=h_ok[:, None] & (dd[None, :] < DR),
                     other=0.0)
        if UPCAST:  # Triton's interpreter computes bfloat16 dots wrongly: float32 dots of the same values
            ql = ql.to(tl.float32)
            qr = qr.to(tl.float32)
        start = sp * split_len
        end = tl.minimum(start + split_len, k_len)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
        c_base = C + b * s_cb
        k_base = KR + b * s_kb + g * s_kg
        for n0 in range(start, end, BLOCK_N):
            n = n0 + nn
            n_ok = n < end
            c_rows = c_base + n[:, None] * s_cn
            # column masks only where a width is not a power of two (DeepSeek's 512 and 64 need none): row masks
            # alone keep the loads vectorised along the row
            if DR == BLOCK_DR:
                kr = tl.load(k_base + n[:, None] * s_kn + dd[None, :], mask=n_ok[:, None], other=0.0)
            else:
                kr = tl.load(k_base + n[:, None] * s_kn + dd[None, :], mask=n_ok[:, None] & (dd[None, :] < DR),
                             other=0.0)
            if VSPLIT == 1:  # one [BLOCK_N, R] tile: the keys of the score and the values
                if R == BLOCK_R:
                    cv = tl.load(c_rows + rr[None, :], mask=n_ok[:, None], other=0.0)
                else:
                    cv = tl.load(c_rows + rr[None, :], mask=n_ok[:, None] & (rr[None, :] < R), other=0.0)
                if UPCAST:
                    cv = cv.to(tl.float32)
                    kr = kr.to(tl.float32)
                s = tl.dot(ql, tl.trans(cv), input_precision=PREC)
            else:  # the tile as two column halves, each read once: the score takes both, the values this one
                if R == BLOCK_V * 2:
                    cv = tl.load(c_rows + vv[None, :], mask=n_ok[:, None], other=0.0)
                    co = tl.load(c_rows + vo[None, :], mask=n_ok[:, None], other=0.0)
                else:
                    cv = tl.load(c_rows + vv[None, :], mask=n_ok[:, None] & (vv[None, :] < R), other=0.0)
                    co = tl.load(c_rows + vo[None, :], mask=n_ok[:, None] & (vo[None, :] < R), other=0.0)
                if UPCAST:
                    cv = cv.to(tl.float32)
                    co = co.to(tl.float32)
                    kr = kr.to(tl.float32)
                s = tl.dot(ql, tl.trans(cv), input_precision=PREC)
                s += tl.dot(qo, tl.trans(co), input_precision=PREC)
            s += tl.dot(qr, tl.trans(kr), input_precision=PREC)
            s = s * scale_log2
            keep = n_ok
            if HAS_KPM:
                keep = keep & (tl.load(KPM + b * s_mb + n, mask=n_ok, other=0) != 0)
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(cv.dtype), cv, input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        v_ok = vv < R
        if ONE_SPLIT:
            tl.store(O + b * s_ob + heads[:, None] * s_oh + vv[None, :], out.to(O.dtype.element_ty),
                     mask=h_ok[:, None] & v_ok[None, :])
        else:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            row = (b * HEADS + heads) * splits + sp
            tl.store(PO + row[:, None] * R + vv[None, :], out.to(PO.dtype.element_ty),
                     mask=h_ok[:, None] & v_ok[None, :])
            tl.store(PL + row, lse, mask=h_ok & ((hh * 0 + vp) == 0))  # one value part writes it

    @triton.jit(do_not_specialize=["splits"])
    def _combine_kernel(PO, PL, O, s_ob, s_oh, splits, HEADS: tl.constexpr, R: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)  # b * HEADS + h
        b = pid // HEADS
        h = pid % HEADS
        ss = tl.arange(0, BLOCK_S)
        rr = tl.arange(0, BLOCK_R)
        lse = tl.load(PL + pid * splits + ss, mask=ss < splits, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_safe)
        total = tl.sum(w, 0)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for s in range(splits):
            ws = tl.sum(tl.where(ss == s, w, 0.0), 0)
            part = tl.load(PO + (pid * splits + s) * R + rr, mask=rr < R, other=0.0).to(tl.float32)
            acc += ws * part
        out = acc / tl.where(total > 0, total, 1.0)
        tl.store(O + b * s_ob + h * s_oh + rr, out.to(O.dtype.element_ty), mask=rr < R)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch(q_lat, q_rope, c, k_rope, keep, scale: float, cfg: DecodeConfig, out: torch.Tensor) -> None:
    """Run one configuration (every field set) into ``out``; allocates the partials it needs."""
    b, heads, _, r = q_lat.shape
    k_len, rh, dr = c.shape[1], k_rope.shape[2], k_rope.shape[3]
    group = heads // rh
    splits = max(1, min(cfg.splits, -(-k_len // cfg.block_n))) if k_len else 1
    split_len = -(-max(k_len, 1) // splits)
    split_len = -(-split_len // cfg.block_n) * cfg.block_n  # pieces in whole key tiles
    splits = max(1, -(-max(k_len, 1) // split_len))
    vsplit = cfg.value_split
    block_v = _pow2(-(-r // vsplit))
    if splits > 1:
        pdt = torch.float32 if c.dtype == torch.float32 else c.dtype
        po = torch.empty(b * heads * splits, r, device=c.device, dtype=pdt)
        pl = torch.empty(b * heads * splits, device=c.device, dtype=torch.float32)
    else:
        po = pl = out  # unused
    kpm = keep if keep is not None else c  # c: a placeholder pointer, never read
    tiles = -(-group // cfg.block_h)
    _split_kernel[(b * rh * splits * vsplit * tiles,)](
        q_lat, q_rope, c, k_rope, kpm, po, pl, out,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), c.stride(0), c.stride(1),
        k_rope.stride(0), k_rope.stride(1), k_rope.stride(2), kpm.stride(0) if keep is not None else 0,
        out.stride(0), out.stride(1), k_len, split_len, splits, float(scale) * math.log2(math.e),
        HEADS=heads, GROUP=group, ROPE_HEADS=rh, R=r, DR=dr, BLOCK_R=_pow2(r), BLOCK_DR=_pow2(dr), BLOCK_V=block_v,
        VSPLIT=vsplit, ONE_SPLIT=splits == 1, HAS_KPM=keep is not None, PREC=_precision(c.dtype),
        UPCAST=interpreted() and c.dtype == torch.bfloat16, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        _combine_kernel[(b * heads,)](po, pl, out, out.stride(0), out.stride(1), splits, HEADS=heads, R=r,
                                      BLOCK_S=_pow2(splits, 2), BLOCK_R=_pow2(r), num_warps=4)


def _prepare(q_lat, q_rope, c, k_rope, key_padding_mask, mask):
    """Inputs with a contiguous last dim, and the keep mask as uint8 ``[B, S]`` (or None)."""
    b, k_len = q_lat.shape[0], c.shape[1]
    keep = key_padding_mask
    if mask is not None:
        m = mask.reshape(mask.shape[0], k_len).expand(b, k_len)
        keep = m if keep is None else keep & m
    q_lat = q_lat if q_lat.stride(-1) == 1 else q_lat.contiguous()
    q_rope = q_rope if q_rope.stride(-1) == 1 else q_rope.contiguous()
    c = c if c.stride(-1) == 1 else c.contiguous()
    k_rope = k_rope if k_rope.stride(-1) == 1 else k_rope.contiguous()
    keep = keep.to(torch.uint8) if keep is not None else None
    return q_lat, q_rope, c, k_rope, keep


def _decode_impl(q_lat, q_rope, c, k_rope, keep, scale: float, config: DecodeConfig | None) -> torch.Tensor:
    b, heads, _, r = q_lat.shape
    rh, dr = k_rope.shape[2], k_rope.shape[3]
    out = torch.empty(b, heads, 1, r, device=c.device, dtype=c.dtype)
    cfg, source = plan(q_lat, c, rh, dr, keep is not None, config)
    if (source == "heuristic" and c.is_cuda and not interpreted() and b * c.shape[1] >= TUNE_MIN_TOKENS
            and not _capturing()):
        fam = _family(c.device, heads, rh, r, dr, c.dtype, keep is not None)
        tuned = _tune(fam, lambda cf: _launch(q_lat, q_rope, c, k_rope, keep, scale, cf, out), q_lat, c, rh, dr,
                      config)
        if tuned is not None:
            source = "tuned"
            cfg = choose_config(b, heads, rh, c.shape[1], r, dr, c.element_size(), c.device,
                                (config or DecodeConfig()).filled_from(tuned))
    _launch(q_lat, q_rope, c, k_rope, keep, scale, cfg, out)
    _LAST["plan"] = (cfg, source)
    return out


_LAST: dict = {}


def last_plan() -> tuple[DecodeConfig, str] | None:
    """The configuration the last decode call in this process ran and where it came from (``"given"``,
    ``"table"``, ``"tuned"``, ``"heuristic"``); None before the first."""
    return _LAST.get("plan")


# ---------------------------------------------------------------------------------------------- the custom op
def _op_impl(q_lat: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor,
             keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    return _decode_impl(q_lat, q_rope, c, k_rope, keep, scale, None)


def _op_fake(q_lat, q_rope, c, k_rope, keep, scale):
    b, h, _, r = q_lat.shape
    return q_lat.new_empty((b, h, 1, r))


_OPS: dict = {}


def _register_op() -> None:
    """``attnzoo::mla_decode`` (a ``torch.library`` custom op with a fake implementation): what ``torch.compile``
    traces, one opaque node, so the host code around the launch (the plan, the tuner) never breaks the graph."""
    op = None if triton is None else kernel_op("mla_decode", _op_impl, _op_fake)
    if op is not None:
        _OPS["decode"] = op


_register_op()


def latent_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, *,
                  scale: float, key_padding_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  config: DecodeConfig | None = None, compiled: bool | None = None) -> torch.Tensor:
    """One decode step of absorbed MLA: ``q_lat [B, H, 1, R]``, ``q_rope [B, H, 1, Dr]``, ``c [B, S, R]`` and
    ``k_rope [B, S, Rh, Dr]`` (strided views are read in place; the last dim must be contiguous) ->
    ``o_lat [B, H, 1, R]``. ``key_padding_mask [B, S]`` / ``mask [B|1, 1, 1, S]``: True = attend. A sequence with
    no key to attend gives 0. ``config``: see :func:`plan`. ``compiled``: go through the ``attnzoo::mla_decode``
    custom op (default: inside ``torch.compile`` only; True also in eager, for tests; not with a ``config``)."""
    q_lat, q_rope, c, k_rope, keep = _prepare(q_lat, q_rope, c, k_rope, key_padding_mask, mask)
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    if compiled and config is None and "decode" in _OPS:
        return torch.ops.attnzoo.mla_decode(q_lat, q_rope, c, k_rope, keep, float(scale))
    return _decode_impl(q_lat, q_rope, c, k_rope, keep, float(scale), config)


def config_dict(cfg: DecodeConfig) -> dict:
    """A config as the table stores it."""
    return {k: v for k, v in asdict(cfg).items() if v is not None}
