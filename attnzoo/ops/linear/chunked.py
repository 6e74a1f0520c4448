"""The stabilised chunkwise form of the linear-attention op in plain PyTorch (any device, autograd through it).

The op is defined in :mod:`.naive`. Computed here chunk by chunk (``chunk`` keys at a time, a few matrix
products per chunk, the chunks' states combined by a log-depth scan, no Python loop over the sequence):

* the denominator rides along with the numerator: a ones column appended to ``v`` (``[v | 1]``), so one
  product gives both;
* **key stabiliser** (exponential feature maps, ``k_log`` given): the key rows are stored at the running
  maximum ``m_j = max_{t <= j} k_log_t`` of the keys seen so far, never a maximum over the future; a query
  ``i`` reads key ``j <= i`` with the factor ``exp(m_j - m_i) <= 1``, exactly a scalar-gated linear attention
  with gate ``m_{j-1} - m_j <= 0``. Every exponent is ``<= 0``: nothing overflows, and changing tokens after
  ``i`` cannot change query ``i``'s numbers, not even by rounding. Non-causal attention subtracts the maximum
  over all keys (it reads every key anyway);
* the exact-softmax ``window`` (causal): the linear part reads the keys shifted by ``window`` (query ``i``: keys
  ``j <= i - window``); the window part is a banded softmax over blocks of ``window`` queries; the two are
  added in log space (each part's numerator and denominator with its own log-scale), one shared normaliser.

:func:`linear_attention_chunked` also takes and returns the recurrent state (``LinearState``): decoding and
prefill with a cache use the same code.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LinearState", "linear_attention_chunked", "causal_parts", "chunk_core", "window_parts", "combine_parts",
           "shift_keys", "stabilised_keys", "state_after"]

NEG = float("-inf")


class LinearState(NamedTuple):
    """The recurrent state after some keys: ``kv [b, hkv, f, dv + 1]`` (``sum_j phi~(k_j) [v_j | 1]^T``, the
    last column the normaliser) stored at log-scale ``m [b, hkv]`` (the keys' running maximum log-scale; 0 for
    maps without one)."""

    kv: torch.Tensor
    m: torch.Tensor


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def shift_keys(t: torch.Tensor, by: int, dim: int, fill: float | bool = 0.0) -> torch.Tensor:
    """``t`` moved ``by`` positions later along ``dim`` (the sequence), the first ``by`` filled with ``fill``."""
    if by == 0:
        return t
    n = t.shape[dim]
    shape = list(t.shape)
    shape[dim] = min(by, n)
    head = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    return torch.cat([head, t.narrow(dim, 0, n - shape[dim])], dim)


def _scan(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of ``s_c = a_c s_{c-1} + x_c`` over dim 2 (``x [b, h, nc, f, e]``, ``a [b, h, nc]``),
    Hillis-Steele: log2(nc) steps of whole-tensor work."""
    nc, s = x.shape[2], 1
    while s < nc:
        x = torch.cat([x[:, :, :s], x[:, :, s:] + a[:, :, s:, None, None] * x[:, :, :-s]], 2)
        a = torch.cat([a[:, :, :s], a[:, :, s:] * a[:, :, :-s]], 2)
        s *= 2
    return x


def _running_max(k_log: torch.Tensor, m0: torch.Tensor | None):
    """(``m``: running max of ``k_log`` [b, h, n] starting from ``m0``, with positions before any key set to the
    first key's value (their keys are zero); ``seen``: whether any key is at or before each position)."""
    if m0 is not None:
        k_log = torch.cat([m0[..., None], k_log], -1)
    m = torch.cummax(k_log, -1).values
    if m0 is not None:
        m = m[..., 1:]
    seen = m > NEG
    first = m.masked_fill(~seen, math.inf).amin(-1, keepdim=True)
    first = first.masked_fill(torch.isinf(first), 0.0)
    return torch.where(seen, m, first), seen


def stabilised_keys(kf, *, valid=None, k_log=None, initial_state: LinearState | None = None):
    """The keys as the causal state stores them: ``(kt, m, seen, gated)``, ``kt = kf exp(k_log - m)`` (0 for
    padding), ``m [b, hkv, n]`` the running maximum of the log-scales (from ``initial_state.m``; zeros when not
    ``gated``, i.e. without log-scales), ``seen`` whether any key is at or before each position. Per-row scales in
    float32 (float64 for float64); the feature rows keep their dtype. ``m`` is detached (a stabiliser)."""
    ct = _compute_dtype(kf)
    b, hkv, n, _ = kf.shape
    if valid is not None:
        kf = kf * valid[:, None, :, None].to(kf.dtype)
    gated = k_log is not None or (initial_state is not None and bool((initial_state.m != 0).any()))
    if gated:
        r = (k_log.to(ct) if k_log is not None else torch.zeros(b, hkv, n, dtype=ct, device=kf.device))
        if valid is not None:
            r = r.masked_fill(~valid[:, None, :], NEG)
        m, seen = _running_max(r.detach(), None if initial_state is None else initial_state.m.to(ct))
        kt = kf * torch.exp(r - m)[..., None].to(kf.dtype)  # m, a stabiliser, is detached: the output does not depend on it
    else:
        m = torch.zeros(b, hkv, n, dtype=ct, device=kf.device)
        seen = torch.ones(b, hkv, n, dtype=torch.bool, device=kf.device) if valid is None else \
            torch.cummax(valid[:, None, :].expand(b, hkv, n).to(torch.int8), -1).values.bool()
        kt = kf
    return kt, m, seen, gated


def state_after(kt, v, m, upto: int, initial_state: LinearState | None = None, seen=None) -> LinearState:
    """The state of the first ``upto`` keys (and ``initial_state``'s before them) from :func:`stabilised_keys`'
    ``kt``, ``m``: ``sum_j kt_j exp(m_j - m_p) [v_j | 1]^T`` at log-scale ``m_p``, ``p = upto - 1`` (one GEMM;
    the windowed kernels' state for a cache, whose keys stop ``window`` before the end)."""
    ct = m.dtype
    b, hkv = kt.shape[:2]
    if upto <= 0:
        if initial_state is not None:
            return LinearState(initial_state.kv.to(ct), initial_state.m.to(ct))
        return LinearState(torch.zeros(b, hkv, kt.shape[-1], v.shape[-1] + 1, dtype=ct, device=kt.device),
                           torch.zeros(b, hkv, dtype=ct, device=kt.device))
    mp = m[..., upto - 1]
    if seen is not None:  # no key yet: keep the scale a later key would not set (its keys are all zero here)
        mp = torch.where(seen[..., upto - 1], mp, initial_state.m.to(ct) if initial_state is not None else 0.0)
    w = (m[..., :upto] - mp[..., None]).exp()
    if seen is not None:
        w = w.masked_fill(~seen[..., :upto], 0.0)
    v1 = torch.cat([v[:, :, :upto].to(ct), torch.ones(b, hkv, upto, 1, dtype=ct, device=v.device)], -1)
    S = torch.einsum("bhjf,bhje->bhfe", kt[:, :, :upto].to(ct) * w[..., None], v1)
    if initial_state is not None:
        S = S + initial_state.kv.to(ct) * (initial_state.m.to(ct) - mp).exp()[..., None, None]
    return LinearState(S, mp)


def causal_parts(qf, kf, v, *, valid=None, k_log=None, initial_state: LinearState | None = None, chunk: int = 64,
                 core=None):
    """Causal linear attention, unnormalised: ``(num [b, hq, n, dv], den [b, hq, n], m [b, hkv, n], seen
    [b, hkv, n], state)``; the true numerator is ``num * exp(m)`` (times the queries' own log-scale), ``seen``
    False where no key was read yet. ``qf [b, hq, n, f]``, ``kf [b, hkv, n, f]``, ``v [b, hkv, n, dv]``,
    ``valid [b, n]`` bool, ``k_log [b, hkv, n]`` or None. ``core``: the chunk computation (:func:`chunk_core`,
    or the fused kernels' with the same signature)."""
    kt, m, seen, gated = stabilised_keys(kf, valid=valid, k_log=k_log, initial_state=initial_state)
    ct = m.dtype
    if initial_state is not None:
        seen = seen | (initial_state.kv[..., -1].abs().sum(-1) > 0)[..., None]
        G0, S0 = -initial_state.m.to(ct), initial_state.kv.to(ct)
    else:
        G0, S0 = -m[..., 0], None
    num, den, S = (core or chunk_core)(qf, kt, v, -m, G0, S0, chunk=chunk, gated=gated)
    return num, den, m, seen, LinearState(S, m[..., -1])


def chunk_core(qf, kt, v, G, G0, S0, *, chunk: int = 64, gated: bool = True):
    """The chunk computation: ``A_ij = qf_i . kt_j exp(G_i - G_j)`` for ``j <= i`` (with the state ``S0`` of the
    keys before, at log-scale ``-G0``), ``num = A [v]``, ``den = A 1``; returns ``(num [b, hq, n, dv], den
    [b, hq, n], S [b, hkv, f, dv + 1])``, ``S`` the state after the last key at log-scale ``-G[..., -1]``.
    ``G`` is non-increasing along the sequence (every factor is ``<= 1``)."""
    ct = _compute_dtype(qf)
    b, hq, n, f = qf.shape
    hkv, dv = kt.shape[1], v.shape[-1]
    g = hq // hkv
    qf, kt, v = qf.to(ct), kt.to(ct), v.to(ct)
    v1 = torch.cat([v, torch.ones(b, hkv, n, 1, dtype=ct, device=qf.device)], -1)  # [v | 1]: den rides along
    pad = (-n) % chunk
    G = G.to(ct)
    if pad:
        qf, kt, v1 = F.pad(qf, (0, 0, 0, pad)), F.pad(kt, (0, 0, 0, pad)), F.pad(v1, (0, 0, 0, pad))
        G = torch.cat([G, G[..., -1:].expand(b, hkv, pad)], -1)
    nc = (n + pad) // chunk
    Q = qf.view(b, hkv, g, nc, chunk, f)
    K = kt.view(b, hkv, nc, chunk, f)
    V = v1.view(b, hkv, nc, chunk, dv + 1)
    Gc = G.view(b, hkv, nc, chunk)
    Ge = Gc[..., -1]  # the scale each chunk's state ends at
    Gprev = torch.cat([G0.to(ct)[..., None], Ge[..., :-1]], -1)  # the scale of the state entering each chunk
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=qf.device).tril()
    decay = torch.where(tril, Gc[..., :, None] - Gc[..., None, :], NEG).exp()[:, :, None] if gated else tril.to(ct)
    A = torch.einsum("bhgcif,bhcjf->bhgcij", Q, K) * decay
    intra = torch.einsum("bhgcij,bhcje->bhgcie", A, V)
    T = torch.einsum("bhcjf,bhcje->bhcfe", K * (Ge[..., None] - Gc).exp()[..., None] if gated else K, V)
    a = (Ge - Gprev).exp()
    if S0 is not None:
        T = torch.cat([T[:, :, :1] + a[:, :, :1, None, None] * S0[:, :, None].to(ct), T[:, :, 1:]], 2)
    S_out = _scan(T, a)
    S_in = torch.cat([S0[:, :, None].to(ct) if S0 is not None else torch.zeros_like(S_out[:, :, :1]),
                      S_out[:, :, :-1]], 2)
    inter = torch.einsum("bhgcif,bhcfe->bhgcie", Q, S_in)
    if gated:
        inter = inter * (Gc - Gprev[..., None]).exp()[:, :, None, ..., None]
    out = (inter + intra).reshape(b, hkv, g, nc * chunk, dv + 1)[..., :n, :].reshape(b, hq, n, dv + 1)
    return out[..., :dv], out[..., dv], S_out[:, :, -1]


def window_parts(q, k, v, *, window: int, valid=None, scale: float):
    """The exact-softmax window, unnormalised: ``(num [b, hq, n, dv], den [b, hq, n], M [b, hq, n])``, the true
    numerator ``num * exp(M)``; query ``i`` reads keys ``i - window < j <= i`` (``M = -inf``: none)."""
    ct = _compute_dtype(q)
    b, hq, n, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    W = window
    pad = (-n) % W
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    ok = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
    if pad:
        q, k, v = F.pad(q, (0, 0, 0, pad)), F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        ok = F.pad(ok, (0, pad), value=False)
    nb = (n + pad) // W
    Kb, Vb = k.view(b, hkv, nb, W, d), v.view(b, hkv, nb, W, dv)
    okb = ok.view(b, nb, W)
    K2 = torch.cat([F.pad(Kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], Kb], 3)  # previous block, then this one
    V2 = torch.cat([F.pad(Vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], Vb], 3)
    ok2 = torch.cat([F.pad(okb, (0, 0, 1, 0))[:, :-1], okb], 2)  # [b, nb, 2W]
    Q = q.view(b, hkv, g, nb, W, d)
    s = torch.einsum("bhgcid,bhcjd->bhgcij", Q, K2) * scale
    i = torch.arange(W, device=q.device)[:, None] + W
    j = torch.arange(2 * W, device=q.device)[None, :]
    band = (i - j >= 0) & (i - j < W)
    keep = band[None, None] & ok2[:, :, None, :]  # [b, nb, W, 2W]
    s = s.masked_fill(~keep[:, None, None], NEG)
    M = s.detach().amax(-1)
    Ms = M.masked_fill(torch.isinf(M), 0.0)
    p = (s - Ms[..., None]).exp()
    num = torch.einsum("bhgcij,bhcje->bhgcie", p, V2)
    den = p.sum(-1)
    def flat(t, *tail):
        return t.reshape(b, hq, nb * W, *tail)[:, :, :n]
    return flat(num, dv), flat(den), flat(M)


def combine_parts(parts) -> torch.Tensor:
    """``sum num_p exp(L_p) / sum den_p exp(L_p)`` over ``parts`` = [(num, den, L)], 0 where nothing was read."""
    T = torch.stack([L for _, _, L in parts]).amax(0)
    T = T.masked_fill(torch.isinf(T), 0.0)
    num = sum(nu * (L - T).exp()[..., None] for nu, _, L in parts)
    den = sum(de * (L - T).exp() for _, de, L in parts)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where((den > 0)[..., None], num / safe[..., None], torch.zeros_like(num))


def linear_attention_chunked(qf, kf, v, *, causal: bool = False, valid=None, q_log=None, k_log=None,
                             window: int = 0, q=None, k=None, scale: float | None = None,
                             initial_state: LinearState | None = None, return_state: bool = False,
                             chunk: int = 64, causal_fn=None, window_fn=None):
    """The op of :mod:`.naive` (arguments as :func:`.naive.linear_attention_naive`, ``valid`` = the key padding
    mask, queries and keys at the same positions), stabilised and chunked. ``initial_state``: the state of the
    keys before these (causal); ``return_state``: also return the state after them (keys up to ``n - window``
    with a window). ``causal_fn``: a replacement for :func:`chunk_core` (the fused kernels); ``window_fn``: the
    whole causal window hybrid in one (the fused kernels' :func:`.triton_kernel.window_fused`, same arguments)."""
    out_dtype = v.dtype
    if not causal:
        if window:
            raise ValueError(f"window={window}: the softmax window is causal (the last `window` keys)")
        if initial_state is not None:
            raise ValueError("initial_state: a recurrent state is for causal attention")
        return _noncausal(qf, kf, v, valid, k_log).to(out_dtype)
    def fn(*args, **kw):
        return causal_parts(*args, **kw, core=causal_fn)

    if not window:
        num, den, _, _, state = fn(qf, kf, v, valid=valid, k_log=k_log, initial_state=initial_state, chunk=chunk)
        safe = torch.where(den > 0, den, torch.ones_like(den))
        out = torch.where((den > 0)[..., None], num / safe[..., None], torch.zeros_like(num)).to(out_dtype)
        return (out, state) if return_state else out
    W = window
    sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if window_fn is not None:
        kt, m, seen, _ = stabilised_keys(kf, valid=valid, k_log=k_log, initial_state=initial_state)
        G0 = -initial_state.m.to(m.dtype) if initial_state is not None else -m[..., 0]
        S0 = initial_state.kv.to(m.dtype) if initial_state is not None else None
        out = window_fn(qf, kt, v, q, k, -m, G0, S0, valid=valid, q_log=q_log, scale=sc, window=W,
                        chunk=chunk).to(out_dtype)
        return (out, state_after(kt, v, m, kf.shape[2] - W, initial_state, seen)) if return_state else out
    kf_s, v_s = shift_keys(kf, W, 2), shift_keys(v, W, 2)
    ones = torch.ones(kf.shape[0], kf.shape[2], dtype=torch.bool, device=kf.device)
    valid_s = shift_keys(valid if valid is not None else ones, W, 1, False)
    k_log_s = shift_keys(k_log, W, 2, 0.0) if k_log is not None else None
    num_l, den_l, m, seen, state = fn(qf, kf_s, v_s, valid=valid_s, k_log=k_log_s, initial_state=initial_state,
                                      chunk=chunk)
    g = qf.shape[1] // kf.shape[1]
    L = m.repeat_interleave(g, 1) + (q_log.to(m.dtype) if q_log is not None else 0.0)
    L = L.masked_fill(~seen.repeat_interleave(g, 1), NEG)
    num_w, den_w, M = window_parts(q, k, v, window=W, valid=valid, scale=sc)
    out = combine_parts([(num_l, den_l, L), (num_w, den_w, M)]).to(out_dtype)
    return (out, state) if return_state else out


def _noncausal(qf, kf, v, valid, k_log):
    """Two GEMMs, ``S = K^T [V | 1]`` then ``Q S``, in the inputs' dtype (half precision: tensor cores, float32
    accumulation); the scales and the division in float32."""
    ct = _compute_dtype(qf)
    gt = qf.dtype if qf.dtype in (torch.float16, torch.bfloat16) else ct
    b, hq, n, f = qf.shape
    hkv, dv = kf.shape[1], v.shape[-1]
    g = hq // hkv
    kf, v = kf.to(gt), v.to(gt)
    if k_log is not None:
        r = k_log.to(ct)
        if valid is not None:
            r = r.masked_fill(~valid[:, None, :], NEG)
        M = r.detach().amax(-1, keepdim=True)
        kf = kf * (r - M.masked_fill(torch.isinf(M), 0.0)).exp()[..., None].to(gt)
    if valid is not None:
        kf = kf * valid[:, None, :, None].to(gt)
    ones = torch.ones(b, hkv, kf.shape[2], 1, dtype=gt, device=kf.device)
    S = torch.einsum("bhjf,bhje->bhfe", kf, torch.cat([v, ones], -1))
    out = torch.einsum("bhgif,bhfe->bhgie", qf.to(gt).view(b, hkv, g, n, f), S).reshape(b, hq, n, dv + 1).to(ct)
    num, den = out[..., :dv], out[..., dv]
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where((den > 0)[..., None], num / safe[..., None], torch.zeros_like(num))
