"""MLA's absorbed decode as a split-KV Triton kernel (flash-decoding over the latent cache).

One new token per sequence. The cached sequence is cut into ``splits`` contiguous pieces; one program takes a
tile of ``block_h`` query heads (heads that share one rope key) and one piece, streams its latents ``c`` and rope
keys (``[BLOCK_N, R]`` and ``[BLOCK_N, Dr]`` tiles, read in place from the cache's own strides), and keeps an online
softmax: scores ``q_lat · c + q_rope · k_rope`` (one dot of width ``R`` and one of ``Dr``: the ``[c; k_rope]``
concatenation is never built), output ``Σ p c`` (the latent is the value). Each program writes its piece's
normalised output and base-2 log-sum-exp; a second kernel combines the pieces per head. With one piece the first
kernel writes the output itself.

The head tiles of one piece are launched next to each other, so the cache tile they all read is fetched from
memory once and served from L2 to the others. ``splits`` is chosen to fill the GPU's SMs in whole waves while
keeping the float32 partial outputs (``heads · splits · R`` per sequence) small against the cache itself
(:func:`choose_config`). On CUDA the tile sizes, warps and pipeline stages are tuned on the first call of a shape
(``triton.autotune`` over :data:`TUNE_CONFIGS`, keyed by heads, widths, dtype and split count); a
:class:`DecodeConfig` with any tile field set runs that configuration as given (the tests, the interpreter).

Float32 inputs take IEEE float32 dots unless torch allows TF32 (``torch.backends.cuda.matmul.allow_tf32``).
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests/test_mla_decode.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sparse.triton_kernel import available as _triton_available
from ..sparse.triton_kernel import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: attnzoo works without Triton
    triton = None

__all__ = ["DecodeConfig", "choose_config", "latent_decode", "unavailable_reason", "interpreted"]


@dataclass(frozen=True)
class DecodeConfig:
    """Launch settings of the decode kernel (None: :func:`choose_config` decides)."""

    block_h: int | None = None
    block_n: int | None = None
    splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def choose_config(batch: int, heads: int, rope_heads: int, k_len: int, kv_rank: int, rope_dim: int,
                  elem: int, device: torch.device, given: DecodeConfig | None = None) -> DecodeConfig:
    """Fill in what ``given`` leaves open. ``splits``: the count (1..32) with the least estimated time, counting
    in waves of programs over the SMs, the cache bytes each program reads and the float32 partials written and
    read back (none with one split)."""
    g = given or DecodeConfig()
    group = heads // rope_heads
    big = kv_rank >= 256
    block_h = g.block_h or min(64 if big else 32, _pow2(group))
    block_n = g.block_n or (32 if big else 64)
    num_warps = g.num_warps or (8 if big else 4)
    num_stages = g.num_stages or 2
    splits = g.splits
    if splits is None:
        tiles = batch * rope_heads * -(-group // block_h)
        sms = _sm_count(device)
        per_token = (kv_rank + rope_heads * rope_dim) * elem
        best = None
        for s in range(1, 33):
            if s > 1 and k_len < s * 2 * block_n:
                break
            waves = -(-tiles * s // sms)
            # per wave, a program reads its piece of the cache and (split) writes its float32 partial output
            program = math.ceil(k_len / s) * per_token + (0 if s == 1 else block_h * (kv_rank + 1) * 4 * 2)
            if best is None or waves * program < best[0]:
                best = (waves * program, s)
        splits = best[1]
    return DecodeConfig(block_h, block_n, splits, num_warps, num_stages)


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

    @triton.jit
    def _split_kernel(QL, QR, C, KR, KPM, PO, PL, O,
                      s_qlb, s_qlh, s_qrb, s_qrh, s_cb, s_cn, s_kb, s_kn, s_kg, s_mb, s_ob, s_oh,
                      k_len, split_len, scale_log2,
                      HEADS: tl.constexpr, GROUP: tl.constexpr, ROPE_HEADS: tl.constexpr, R: tl.constexpr,
                      DR: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
                      HAS_KPM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        TILES = (GROUP + BLOCK_H - 1) // BLOCK_H
        pid = tl.program_id(0)
        t = pid % TILES  # head tiles of one piece run side by side (they read the same cache tiles)
        rest = pid // TILES
        sp = rest % SPLITS
        rest = rest // SPLITS
        g = rest % ROPE_HEADS
        b = (rest // ROPE_HEADS).to(tl.int64)  # batch offsets of a long cache pass 2**31 elements
        hh = t * BLOCK_H + tl.arange(0, BLOCK_H)  # head within the group
        h_ok = hh < GROUP
        heads = g * GROUP + hh
        rr = tl.arange(0, BLOCK_R)
        dd = tl.arange(0, BLOCK_DR)
        nn = tl.arange(0, BLOCK_N)
        ql = tl.load(QL + b * s_qlb + heads[:, None] * s_qlh + rr[None, :], mask=h_ok[:, None] & (rr[None, :] < R),
                     other=0.0)
        qr = tl.load(QR + b * s_qrb + heads[:, None] * s_qrh + dd[None, :], mask=h_ok[:, None] & (dd[None, :] < DR),
                     other=0.0)
        if UPCAST:  # Triton's interpreter computes bfloat16 dots wrongly: float32 dots of the same values
            ql = ql.to(tl.float32)
            qr = qr.to(tl.float32)
        start = sp * split_len
        end = tl.minimum(start + split_len, k_len)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        c_base = C + b * s_cb
        k_base = KR + b * s_kb + g * s_kg
        for n0 in range(start, end, BLOCK_N):
            n = n0 + nn
            n_ok = n < end
            c = tl.load(c_base + n[:, None] * s_cn + rr[None, :], mask=n_ok[:, None] & (rr[None, :] < R), other=0.0)
            kr = tl.load(k_base + n[:, None] * s_kn + dd[None, :], mask=n_ok[:, None] & (dd[None, :] < DR),
                         other=0.0)
            if UPCAST:
                c = c.to(tl.float32)
                kr = kr.to(tl.float32)
            s = tl.dot(ql, tl.trans(c), input_precision=PREC)
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
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if SPLITS == 1:
            tl.store(O + b * s_ob + heads[:, None] * s_oh + rr[None, :], out.to(O.dtype.element_ty),
                     mask=h_ok[:, None] & (rr[None, :] < R))
        else:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            row = (b * HEADS + heads) * SPLITS + sp
            tl.store(PO + row[:, None] * R + rr[None, :], out, mask=h_ok[:, None] & (rr[None, :] < R))
            tl.store(PL + row, lse, mask=h_ok)

    def _prune(configs, named_args, **kwargs):
        """Head tiles no wider than the group (at least 16, tl.dot's minimum); at least one config left."""
        group = kwargs.get("GROUP", named_args.get("GROUP", 1))  # a keyword argument of the launch
        widest = max(16, 1 << (max(int(group), 1) - 1).bit_length())
        kept = [c for c in configs if c.kwargs["BLOCK_H"] <= widest]
        return kept or configs[:1]

    #: the configurations the tuner times on the first call of a shape (heads, widths, dtype, split count)
    TUNE_CONFIGS = [triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                    for bh, bn, w, st in ((64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2),
                                          (32, 64, 4, 2), (32, 32, 4, 3), (32, 32, 8, 3), (16, 64, 4, 2),
                                          (16, 32, 4, 3))]
    _split_kernel_tuned = triton.autotune(TUNE_CONFIGS, key=["HEADS", "GROUP", "R", "DR", "SPLITS", "HAS_KPM", "PREC"],
                                          prune_configs_by={"early_config_prune": _prune})(_split_kernel)

    @triton.jit
    def _combine_kernel(PO, PL, O, s_ob, s_oh, HEADS: tl.constexpr, R: tl.constexpr, SPLITS: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)  # b * HEADS + h
        b = pid // HEADS
        h = pid % HEADS
        ss = tl.arange(0, BLOCK_S)
        rr = tl.arange(0, BLOCK_R)
        lse = tl.load(PL + pid * SPLITS + ss, mask=ss < SPLITS, other=float("-inf"))
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_safe)
        total = tl.sum(w, 0)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for s in range(SPLITS):
            ws = tl.sum(tl.where(ss == s, w, 0.0), 0)
            part = tl.load(PO + (pid * SPLITS + s) * R + rr, mask=rr < R, other=0.0)
            acc += ws * part
        out = acc / tl.where(total > 0, total, 1.0)
        tl.store(O + b * s_ob + h * s_oh + rr, out.to(O.dtype.element_ty), mask=rr < R)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def latent_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, *,
                  scale: float, key_padding_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  config: DecodeConfig | None = None) -> torch.Tensor:
    """One decode step of absorbed MLA: ``q_lat [B, H, 1, R]``, ``q_rope [B, H, 1, Dr]``, ``c [B, S, R]`` and
    ``k_rope [B, S, Rh, Dr]`` (strided views are read in place; the last dim must be contiguous) ->
    ``o_lat [B, H, 1, R]``. ``key_padding_mask [B, S]`` / ``mask [B|1, 1, 1, S]``: True = attend. A sequence with
    no key to attend gives 0."""
    b, heads, _, r = q_lat.shape
    k_len, rh, dr = c.shape[1], k_rope.shape[2], k_rope.shape[3]
    keep = key_padding_mask
    if mask is not None:
        m = mask.reshape(mask.shape[0], k_len).expand(b, k_len)
        keep = m if keep is None else keep & m
    q_lat = q_lat if q_lat.stride(-1) == 1 else q_lat.contiguous()
    q_rope = q_rope if q_rope.stride(-1) == 1 else q_rope.contiguous()
    c = c if c.stride(-1) == 1 else c.contiguous()
    k_rope = k_rope if k_rope.stride(-1) == 1 else k_rope.contiguous()
    cfg = choose_config(b, heads, rh, k_len, r, dr, c.element_size(), c.device, config)
    fixed = config is not None and any(v is not None for v in (config.block_h, config.block_n, config.num_warps,
                                                                 config.num_stages))
    tune = c.is_cuda and not interpreted() and not fixed
    group = heads // rh
    step = 64 if tune else cfg.block_n  # pieces in whole key tiles of any tuned size
    splits = max(1, min(cfg.splits, -(-k_len // step))) if k_len else 1
    split_len = -(-max(k_len, 1) // splits)
    split_len = -(-split_len // step) * step
    splits = max(1, -(-max(k_len, 1) // split_len))
    out = torch.empty(b, heads, 1, r, device=c.device, dtype=c.dtype)
    if splits > 1:
        po = torch.empty(b * heads * splits, r, device=c.device, dtype=torch.float32)
        pl = torch.empty(b * heads * splits, device=c.device, dtype=torch.float32)
    else:
        po = pl = out  # unused
    kpm = keep.to(torch.uint8) if keep is not None else c  # c: a placeholder pointer, never read
    block_r, block_dr = _pow2(r), _pow2(dr)
    args = (q_lat, q_rope, c, k_rope, kpm, po, pl, out,
            q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), c.stride(0), c.stride(1),
            k_rope.stride(0), k_rope.stride(1), k_rope.stride(2), kpm.stride(0) if keep is not None else 0,
            out.stride(0), out.stride(1), k_len, split_len, float(scale) * math.log2(math.e))
    meta = dict(HEADS=heads, GROUP=group, ROPE_HEADS=rh, R=r, DR=dr, SPLITS=splits, BLOCK_R=block_r,
                BLOCK_DR=block_dr, HAS_KPM=keep is not None, PREC=_precision(c.dtype),
                UPCAST=interpreted() and c.dtype == torch.bfloat16)
    if tune:
        def grid(kw):
            return (b * rh * splits * -(-group // kw["BLOCK_H"]),)
        _split_kernel_tuned[grid](*args, **meta)
    else:
        _split_kernel[(b * rh * splits * -(-group // cfg.block_h),)](
            *args, **meta, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    if splits > 1:
        _combine_kernel[(b * heads,)](po, pl, out, out.stride(0), out.stride(1), HEADS=heads, R=r, SPLITS=splits,
                                      BLOCK_S=_pow2(splits, 2), BLOCK_R=block_r, num_warps=4)
    return out
