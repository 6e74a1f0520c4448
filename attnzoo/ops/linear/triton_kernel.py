"""Fused causal linear attention in Triton: the chunk computation of :func:`.chunked.chunk_core` on tensor cores.

Two kernels, as fla's ``chunk`` kernels:

* ``_states``: one program per (batch x KV head, block of features, block of value columns) walks the chunks in
  order, keeping its block of the state ``S [f, dv]`` (and the normaliser ``z [f]``) in float32 registers; it
  writes the state *entering* each chunk and updates it with ``(K_c * exp(G_end - G_j))^T V_c`` (one
  ``tl.dot``), the older state decayed by ``exp(G_end - G_start) <= 1``;
* ``_outputs``: one program per (chunk, batch x query head, block of value columns), all in parallel:
  ``num = exp(G_i - G_start) Q_c S_c + (Q_c K_c^T * exp(G_i - G_j), j <= i) V_c``, three ``tl.dot`` per
  block of features; the denominator comes from the same scores in the same program (``z`` for the state part,
  the row sums of the intra-chunk scores): the ones column of ``[v | 1]`` without widening ``v``.

Grouped KV heads are read in place (query head ``h`` reads KV head ``h // (hq // hkv)``); rows past the end
are masked. Backward (:class:`_ChunkCore`), three kernels: ``_states_bwd`` walks the chunks in reverse for the
gradient of the state after each chunk (``dH_c = a_c dH_{c+1} + sum_i D_i q_i dO_i^T``, the denominator's
gradient beside it as ``dz``), then ``_dq`` (per chunk and query head) and ``_dkv`` (per chunk and KV head, over
its query heads: no atomics) in parallel. The forward keeps the per-chunk states for them.

The window hybrid (:func:`window_fused`): the same ``_states`` on the keys, then ``_win_fwd`` (a query chunk
against the keys of its own chunk and the previous one, window pairs by ``exp(scale q.k)`` and linear pairs by
the features, the state entering the previous chunk for the rest, the one normaliser in the kernel), backward
``_states_bwd`` with a lag of one chunk, ``_win_dq`` and ``_win_dkv`` (docs/linear.md, "the window hybrid is
fused").
"""
from __future__ import annotations

import torch

from ..sparse.triton_kernel.kernels import interpreted
from .chunked import chunk_core

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is a dependency of torch on Linux
    triton = None

__all__ = ["available", "causal_parts_fused", "chunk_core_fused", "window_fused", "window_fits", "MAX_WINDOW"]


def available() -> str | None:
    """None when the kernels can run here (CUDA, or Triton's interpreter), else why not."""
    if triton is None:
        return "Triton is not installed"
    if not torch.cuda.is_available() and not interpreted():
        return "needs a CUDA device (or TRITON_INTERPRET=1 for Triton's interpreter)"
    return None


if triton is not None:

    @triton.jit
    def _states(K, V, G, G0, S0, Z0, H, Z, SF, ZF, n, NC, F: tl.constexpr, DV: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
        bh = tl.program_id(0)
        kb = tl.program_id(1)
        vb = tl.program_id(2)
        rk = kb * BK + tl.arange(0, BK)
        rv = vb * BV + tl.arange(0, BV)
        rc = tl.arange(0, C)
        mk, mv = rk < F, rv < DV
        S = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
        if HAS_S0:
            S = tl.load(S0 + bh * F * DV + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :],
                        other=0.0).to(tl.float32)
            z = tl.load(Z0 + bh * F + rk, mask=mk, other=0.0).to(tl.float32)
        gp = tl.load(G0 + bh).to(tl.float32)
        for c in range(NC):
            base = c * F * DV
            tl.store(H + bh * NC * F * DV + base + rk[:, None] * DV + rv[None, :], S, mask=mk[:, None] & mv[None, :])
            if vb == 0:
                tl.store(Z + bh * NC * F + c * F + rk, z, mask=mk)
            rows = c * C + rc
            mr = rows < n
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                        other=0.0)
            last = tl.minimum(c * C + C, n) - 1
            g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
            ge = tl.load(G + bh * n + last).to(tl.float32)
            w = tl.where(mr, tl.exp(ge - g), 0.0)
            kd = k.to(tl.float32) * w[:, None]
            a = tl.exp(ge - gp)
            S = S * a + tl.dot(tl.trans(kd.to(v.dtype)), v).to(tl.float32)
            z = z * a + tl.sum(kd, 0)
            gp = ge
        tl.store(SF + bh * F * DV + rk[:, None] * DV + rv[None, :], S, mask=mk[:, None] & mv[None, :])
        if vb == 0:
            tl.store(ZF + bh * F + rk, z, mask=mk)

    @triton.jit
    def _outputs(Q, K, V, G, G0, H, Z, NUM, DEN, n, NC, GROUP, F: tl.constexpr, DV: tl.constexpr,
                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        c = tl.program_id(0)
        bhq = tl.program_id(1)
        vb = tl.program_id(2)
        bh = bhq // GROUP  # batch x KV head (the query heads of a group are consecutive)
        rc = tl.arange(0, C)
        rows = c * C + rc
        mr = rows < n
        rv = vb * BV + tl.arange(0, BV)
        mv = rv < DV
        A = tl.zeros([C, C], dtype=tl.float32)
        o = tl.zeros([C, BV], dtype=tl.float32)
        dz = tl.zeros([C], dtype=tl.float32)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            h = tl.load(H + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0)
            A += tl.dot(q, tl.trans(k)).to(tl.float32)
            o += tl.dot(q, h.to(q.dtype)).to(tl.float32)
            zc = tl.load(Z + bh * NC * F + c * F + rk, mask=mk, other=0.0)
            dz += tl.sum(q.to(tl.float32) * zc[None, :], 1)
        g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        gp = tl.load(G0 + bh).to(tl.float32)
        if c > 0:
            gp = tl.load(G + bh * n + c * C - 1).to(tl.float32)
        inter = tl.exp(g - gp)
        keep = (rc[:, None] >= rc[None, :]) & mr[None, :]
        A = tl.where(keep, A * tl.exp(tl.where(keep, g[:, None] - g[None, :], 0.0)), 0.0)
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        o = o * inter[:, None] + tl.dot(A.to(v.dtype), v).to(tl.float32)
        tl.store(NUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], o, mask=mr[:, None] & mv[None, :])
        if vb == 0:
            tl.store(DEN + bhq * n + rows, dz * inter + tl.sum(A, 1), mask=mr)


    @triton.jit
    def _states_bwd(Q, DNUM, DDEN, G, GQ, ROW, G0, DSF, DZF, DH, DZ, n, NC, GROUP, F: tl.constexpr,
                    DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LAG: tl.constexpr,
                    HAS_ROW: tl.constexpr):
        """Reverse walk: the gradient of the state after each chunk (``DH[c]``: after chunk ``c``), from the final
        state's (``DSF``, ``DZF``) and every chunk's queries: ``dH_c = a_c dH_{c+1} + sum_i D_i q_i dO_i^T``.
        The state entering chunk ``c`` is read by the queries of chunk ``c + LAG`` (1 with a window: they read
        the state entering the chunk before theirs) at the factor ``D_i = exp(GQ_i - G_start + ROW_i)``
        (``GQ``: the queries' gate, ``G`` without a window; ``ROW``: a per-query log-scale of ``DNUM``/``DDEN``)."""
        bh = tl.program_id(0)
        kb = tl.program_id(1)
        vb = tl.program_id(2)
        rk = kb * BK + tl.arange(0, BK)
        rv = vb * BV + tl.arange(0, BV)
        rc = tl.arange(0, C)
        mk, mv = rk < F, rv < DV
        dS = tl.load(DSF + bh * F * DV + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0).to(tl.float32)
        dz = tl.load(DZF + bh * F + rk, mask=mk, other=0.0).to(tl.float32)
        g0 = tl.load(G0 + bh).to(tl.float32)
        for cc in range(NC):
            c = NC - 1 - cc
            tl.store(DH + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :], dS,
                     mask=mk[:, None] & mv[None, :])
            if vb == 0:
                tl.store(DZ + bh * NC * F + c * F + rk, dz, mask=mk)
            rows = (c + LAG) * C + rc
            mr = rows < n
            last = tl.minimum(c * C + C, n) - 1
            ge = tl.load(G + bh * n + last).to(tl.float32)
            gp = g0
            if c > 0:
                gp = tl.load(G + bh * n + c * C - 1).to(tl.float32)
            g = tl.load(GQ + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
            dS = dS * tl.exp(ge - gp)
            dz = dz * tl.exp(ge - gp)
            for h in range(GROUP):
                bhq = bh * GROUP + h
                if HAS_ROW:
                    r = tl.load(ROW + bhq * n + rows, mask=mr, other=0.0).to(tl.float32)
                    d = tl.where(mr, tl.exp(g - gp + r), 0.0)
                else:
                    d = tl.where(mr, tl.exp(g - gp), 0.0)
                q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                             other=0.0)
                dd = tl.load(DDEN + bhq * n + rows, mask=mr, other=0.0)
                qd = q.to(tl.float32) * d[:, None]
                dS += tl.dot(tl.trans(qd.to(q.dtype)), do.to(q.dtype)).to(tl.float32)
                dz += tl.sum(qd * dd[:, None], 0)

    @triton.jit
    def _dq(Q, K, V, G, G0, H, Z, DNUM, DDEN, DQ, n, NC, GROUP, F: tl.constexpr, DV: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """``dq_i = D_i (dO_i H_c^T + dden_i z_c) + sum_{j <= i} (dO_i . v_j + dden_i) e^{g_i - g_j} k_j``."""
        c = tl.program_id(0)
        bhq = tl.program_id(1)
        bh = bhq // GROUP
        rc = tl.arange(0, C)
        rows = c * C + rc
        mr = rows < n
        rv = tl.arange(0, BV)
        mv = rv < DV
        do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        dd = tl.load(DDEN + bhq * n + rows, mask=mr, other=0.0).to(tl.float32)
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        gp = tl.load(G0 + bh).to(tl.float32)
        if c > 0:
            gp = tl.load(G + bh * n + c * C - 1).to(tl.float32)
        d = tl.exp(g - gp)
        keep = (rc[:, None] >= rc[None, :]) & mr[None, :] & mr[:, None]
        dA = tl.dot(do.to(v.dtype), tl.trans(v)).to(tl.float32) + dd[:, None]
        dA = tl.where(keep, dA * tl.exp(tl.where(keep, g[:, None] - g[None, :], 0.0)), 0.0)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            h = tl.load(H + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0)
            z = tl.load(Z + bh * NC * F + c * F + rk, mask=mk, other=0.0)
            dq = tl.dot(dA.to(k.dtype), k).to(tl.float32)
            dq += d[:, None] * (tl.dot(do.to(k.dtype), tl.trans(h.to(k.dtype))).to(tl.float32) + dd[:, None] * z[None, :])
            tl.store(DQ + bhq * n * F + rows[:, None] * F + rk[None, :], dq, mask=mr[:, None] & mk[None, :])

    @triton.jit
    def _dkv(Q, K, V, G, DH, DZ, DNUM, DDEN, DK, DV_, n, NC, GROUP, F: tl.constexpr, DV: tl.constexpr,
             C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """Per chunk and KV head, over its query heads: ``dv_j = sum_i A_ij dO_i + w_j k_j dH``,
        ``dk_j = sum_i dA_ij e^{g_i - g_j} q_i + w_j (dH v_j + dz)``, ``w_j = e^{g_end - g_j}``, ``dH``/``dz`` the
        gradient of the state after this chunk."""
        c = tl.program_id(0)
        bh = tl.program_id(1)
        rc = tl.arange(0, C)
        rows = c * C + rc
        mr = rows < n
        rv = tl.arange(0, BV)
        mv = rv < DV
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        last = tl.minimum(c * C + C, n) - 1
        ge = tl.load(G + bh * n + last).to(tl.float32)
        w = tl.where(mr, tl.exp(ge - g), 0.0)
        keep = (rc[:, None] >= rc[None, :]) & mr[None, :] & mr[:, None]
        decay = tl.where(keep, tl.exp(tl.where(keep, g[:, None] - g[None, :], 0.0)), 0.0)
        dv = tl.zeros([C, BV], dtype=tl.float32)
        for h in range(GROUP):
            bhq = bh * GROUP + h
            s = tl.zeros([C, C], dtype=tl.float32)
            for k0 in range(0, F, BK):
                rk = k0 + tl.arange(0, BK)
                mk = rk < F
                q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                s += tl.dot(q, tl.trans(k)).to(tl.float32)
            do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                         other=0.0)
            dv += tl.dot(tl.trans((s * decay).to(do.dtype)), do).to(tl.float32)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            k = tl.load(K + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            dh = tl.load(DH + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :],
                         mask=mk[:, None] & mv[None, :], other=0.0)
            dz = tl.load(DZ + bh * NC * F + c * F + rk, mask=mk, other=0.0)
            dv += w[:, None] * tl.dot(k, dh.to(k.dtype)).to(tl.float32)
            dk = w[:, None] * (tl.dot(v, tl.trans(dh.to(v.dtype))).to(tl.float32) + dz[None, :])
            for h in range(GROUP):
                bhq = bh * GROUP + h
                do = tl.load(DNUM + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :],
                             other=0.0)
                dd = tl.load(DDEN + bhq * n + rows, mask=mr, other=0.0).to(tl.float32)
                q = tl.load(Q + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                dp = (tl.dot(do.to(v.dtype), tl.trans(v)).to(tl.float32) + dd[:, None]) * decay
                dk += tl.dot(tl.trans(dp.to(q.dtype)), q).to(tl.float32)
            tl.store(DK + bh * n * F + rows[:, None] * F + rk[None, :], dk, mask=mr[:, None] & mk[None, :])
        tl.store(DV_ + bh * n * DV + rows[:, None] * DV + rv[None, :], dv, mask=mr[:, None] & mv[None, :])


    # ------------------------------------------------------------------ the window hybrid
    # Query i reads its window keys i - W < j <= i by exp(scale q_i.k_j) and the keys j <= i - W by the features,
    # one shared normaliser. With chunks of C >= W keys, the window keys of a query of chunk c lie in chunks c - 1
    # and c: a program scores its queries against those two chunks (features and raw q.k; each pair is a window
    # or a linear one, by its distance) and reads the state entering chunk c - 1 for the rest. The linear weights
    # are read at the queries' gate GQ_i = G_{i - W} (the running maximum of the keys they read linearly) and
    # combined with the window's in log space before the one division: T_i = max(window's max score, L_i +
    # log(linear denominator)), L_i = q_log_i - GQ_i, so every weight is <= 1 and the sum >= 1 (no overflow).

    @triton.jit
    def _gate_q(G, G0, bh, n, rows, mr, W):
        """The queries' gate: ``G`` at ``i - W`` (``G0`` before the first key)."""
        qpos = rows - W
        g0 = tl.load(G0 + bh).to(tl.float32)
        gq = tl.load(G + bh * n + qpos, mask=(qpos >= 0) & mr, other=0.0).to(tl.float32)
        return tl.where(qpos >= 0, gq, g0)

    @triton.jit
    def _gate_prev(G, G0, bh, n, c, C: tl.constexpr):
        """``(pi, gprev)``: the chunk whose entering state the queries of chunk ``c`` read (``c - 1``, or 0),
        and that state's gate."""
        pi = tl.maximum(c - 1, 0)
        gprev = tl.load(G0 + bh).to(tl.float32)
        if pi > 0:
            gprev = tl.load(G + bh * n + pi * C - 1).to(tl.float32)
        return pi, gprev

    @triton.jit
    def _key_ok(VALID, bi, n, rows, m, HAS_VALID: tl.constexpr):
        """The keys at ``rows`` that exist (``m``) and are not padding."""
        ok = m
        if HAS_VALID:
            ok = ok & (tl.load(VALID + bi * n + rows, mask=m, other=0) != 0)
        return ok

    @triton.jit
    def _win_e(qr, kr, lse, cl, gq, g, win, lin, scale):
        """The normalised weights' factor ``E`` of a tile: ``exp(scale q.k - lse)`` in the window, ``exp(GQ_i -
        G_j + CL_i)`` for the linear pairs (the feature product left out), 0 elsewhere."""
        keep = win | lin
        x = tl.where(win, tl.dot(qr, tl.trans(kr)).to(tl.float32) * scale - lse[:, None],
                     gq[:, None] - g[None, :] + cl[:, None])
        return tl.where(keep, tl.exp(tl.where(keep, x, 0.0)), 0.0)

    @triton.jit
    def _win_dp(do, v, delta):
        """``dP_ij = dO_i . v_j - Delta_i``."""
        return tl.dot(do, tl.trans(v)).to(tl.float32) - delta[:, None]

    @triton.jit
    def _win_fwd(QF, KT, V, QR, KR, QL, VALID, G, G0, H, Z, OUT, LSE, CL, n, NC, GROUP, HQ, W, scale,
                 F: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 BD: tl.constexpr, BV: tl.constexpr, HAS_QL: tl.constexpr, HAS_VALID: tl.constexpr):
        """Outputs of chunk ``c`` for one query head (a block of value columns), normalised; ``LSE`` the log of
        the true denominator, ``CL = L - LSE`` (the linear part's factor; -inf without one) for the backward."""
        c = tl.program_id(0)
        bhq = tl.program_id(1)
        vb = tl.program_id(2)
        bh = bhq // GROUP
        bi = bhq // HQ
        rc = tl.arange(0, C)
        rows = c * C + rc
        prow = rows - C
        mr = rows < n
        mp = prow >= 0
        rv = vb * BV + tl.arange(0, BV)
        mv = rv < DV
        rd = tl.arange(0, BD)
        md = rd < D
        pi, gprev = _gate_prev(G, G0, bh, n, c, C)
        a_p = tl.zeros([C, C], dtype=tl.float32)
        a_c = tl.zeros([C, C], dtype=tl.float32)
        oi = tl.zeros([C, BV], dtype=tl.float32)
        zi = tl.zeros([C], dtype=tl.float32)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            q = tl.load(QF + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            kp = tl.load(KT + bh * n * F + prow[:, None] * F + rk[None, :], mask=mp[:, None] & mk[None, :], other=0.0)
            kc = tl.load(KT + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            h = tl.load(H + bh * NC * F * DV + pi * F * DV + rk[:, None] * DV + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0)
            z = tl.load(Z + bh * NC * F + pi * F + rk, mask=mk, other=0.0)
            a_p += tl.dot(q, tl.trans(kp)).to(tl.float32)
            a_c += tl.dot(q, tl.trans(kc)).to(tl.float32)
            oi += tl.dot(q, h.to(q.dtype)).to(tl.float32)
            zi += tl.sum(q.to(tl.float32) * z[None, :], 1)
        g_p = tl.load(G + bh * n + prow, mask=mp, other=0.0).to(tl.float32)
        g_c = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        gq = _gate_q(G, G0, bh, n, rows, mr, W)
        L = -gq
        if HAS_QL:
            L += tl.load(QL + bhq * n + rows, mask=mr, other=0.0).to(tl.float32)
        dist = rc[:, None] - rc[None, :]
        ok_p = _key_ok(VALID, bi, n, prow, mp, HAS_VALID)
        ok_c = _key_ok(VALID, bi, n, rows, mr, HAS_VALID)
        win_p = (dist + C < W) & ok_p[None, :]
        win_c = (dist >= 0) & (dist < W) & ok_c[None, :]
        lin_p = (dist + C >= W) & mp[None, :]
        lin_c = (dist >= W) & mr[None, :]
        # one tile per key block (few live tiles: no spills): the linear weights at the queries' gate, then the
        # window's raw scores in their places
        x_p = tl.where(lin_p, a_p * tl.exp(tl.where(lin_p, gq[:, None] - g_p[None, :], 0.0)), 0.0)
        x_c = tl.where(lin_c, a_c * tl.exp(tl.where(lin_c, gq[:, None] - g_c[None, :], 0.0)), 0.0)
        qr = tl.load(QR + bhq * n * D + rows[:, None] * D + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
        krp = tl.load(KR + bh * n * D + prow[:, None] * D + rd[None, :], mask=mp[:, None] & md[None, :], other=0.0)
        x_p = tl.where(win_p, tl.dot(qr, tl.trans(krp)).to(tl.float32) * scale, x_p)
        krc = tl.load(KR + bh * n * D + rows[:, None] * D + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
        x_c = tl.where(win_c, tl.dot(qr, tl.trans(krc)).to(tl.float32) * scale, x_c)
        # the linear part's denominator, the window's maximum, the shared stabiliser T
        fi = tl.exp(gq - gprev)
        dl = zi * fi + tl.sum(tl.where(win_p, 0.0, x_p), 1) + tl.sum(tl.where(win_c, 0.0, x_c), 1)
        has_l = dl > 0
        mx = tl.maximum(tl.max(tl.where(win_p, x_p, float("-inf")), 1), tl.max(tl.where(win_c, x_c, float("-inf")), 1))
        T = tl.maximum(mx, tl.where(has_l, L + tl.log(tl.maximum(dl, 1e-30)), float("-inf")))
        T = tl.where(T > float("-inf"), T, 0.0)
        lt = tl.where(has_l, L - T, 0.0)
        el = tl.exp(lt)  # <= 1 / max(dl, 1e-30): every linear weight times it is <= 1
        p_p = tl.where(win_p, tl.exp(tl.where(win_p, x_p - T[:, None], 0.0)), x_p * el[:, None])
        p_c = tl.where(win_c, tl.exp(tl.where(win_c, x_c - T[:, None], 0.0)), x_c * el[:, None])
        fi = fi * el
        vp = tl.load(V + bh * n * DV + prow[:, None] * DV + rv[None, :], mask=mp[:, None] & mv[None, :], other=0.0)
        vc = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        o = tl.dot(p_p.to(vp.dtype), vp).to(tl.float32) + tl.dot(p_c.to(vc.dtype), vc).to(tl.float32) + \
            oi * fi[:, None]
        den = tl.sum(p_p, 1) + tl.sum(p_c, 1) + zi * fi
        ok = den > 0
        safe = tl.where(ok, den, 1.0)
        tl.store(OUT + bhq * n * DV + rows[:, None] * DV + rv[None, :], o / safe[:, None],
                 mask=mr[:, None] & mv[None, :])
        if vb == 0:
            lse = tl.where(ok, T + tl.log(safe), float("inf"))
            tl.store(LSE + bhq * n + rows, lse, mask=mr)
            tl.store(CL + bhq * n + rows, tl.where(ok & has_l, L - lse, float("-inf")), mask=mr)

    @triton.jit
    def _win_dq(QF, KT, V, QR, KR, VALID, G, G0, H, Z, DO, DELTA, LSE, CL, DQF, DQR, DQL, n, NC, GROUP, HQ, W,
                scale, F: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                BD: tl.constexpr, BV: tl.constexpr, HAS_VALID: tl.constexpr):
        """Per query chunk and head, with ``P_ij`` the normalised weights and ``dP_ij = dO_i.v_j - Delta_i``:
        ``E_ij = exp(s_ij - LSE_i)`` (window) or ``exp(GQ_i - G_j + CL_i)`` (linear); ``dq_i = scale
        sum_win E dP k_j``, ``dqf_i = sum_lin E dP kt_j + exp(GQ_i - G_prev + CL_i) (dO_i H^T - Delta_i z)``,
        ``dq_log_i`` the linear pairs' ``sum P dP`` (``qf_i . dqf_i``) blended with the window's (below)."""
        c = tl.program_id(0)
        bhq = tl.program_id(1)
        bh = bhq // GROUP
        bi = bhq // HQ
        rc = tl.arange(0, C)
        rows = c * C + rc
        prow = rows - C
        mr = rows < n
        mp = prow >= 0
        rv = tl.arange(0, BV)
        mv = rv < DV
        rd = tl.arange(0, BD)
        md = rd < D
        pi, gprev = _gate_prev(G, G0, bh, n, c, C)
        do = tl.load(DO + bhq * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        delta = tl.load(DELTA + bhq * n + rows, mask=mr, other=0.0)
        lse = tl.load(LSE + bhq * n + rows, mask=mr, other=float("inf"))
        cl = tl.load(CL + bhq * n + rows, mask=mr, other=float("-inf"))
        vp = tl.load(V + bh * n * DV + prow[:, None] * DV + rv[None, :], mask=mp[:, None] & mv[None, :], other=0.0)
        vc = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        qr = tl.load(QR + bhq * n * D + rows[:, None] * D + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
        krp = tl.load(KR + bh * n * D + prow[:, None] * D + rd[None, :], mask=mp[:, None] & md[None, :], other=0.0)
        krc = tl.load(KR + bh * n * D + rows[:, None] * D + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
        g_p = tl.load(G + bh * n + prow, mask=mp, other=0.0).to(tl.float32)
        g_c = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        gq = _gate_q(G, G0, bh, n, rows, mr, W)
        dist = rc[:, None] - rc[None, :]
        ok_p = _key_ok(VALID, bi, n, prow, mp, HAS_VALID)
        ok_c = _key_ok(VALID, bi, n, rows, mr, HAS_VALID)
        win_p = (dist + C < W) & ok_p[None, :]
        win_c = (dist >= 0) & (dist < W) & ok_c[None, :]
        lin_p = (dist + C >= W) & mp[None, :]
        lin_c = (dist >= W) & mr[None, :]
        e_p = _win_e(qr, krp, lse, cl, gq, g_p, win_p, lin_p, scale)
        e_c = _win_e(qr, krc, lse, cl, gq, g_c, win_c, lin_c, scale)
        gm_p = e_p * _win_dp(do, vp, delta)
        gm_c = e_c * _win_dp(do, vc, delta)
        # the window's share of each row's weight and its sum of P dP, for dq_log below
        s_win = tl.sum(tl.where(win_p, e_p, 0.0), 1) + tl.sum(tl.where(win_c, e_c, 0.0), 1)
        pdp_win = tl.sum(tl.where(win_p, gm_p, 0.0), 1) + tl.sum(tl.where(win_c, gm_c, 0.0), 1)
        dqr = tl.dot(tl.where(win_p, gm_p, 0.0).to(krp.dtype), krp).to(tl.float32) + \
            tl.dot(tl.where(win_c, gm_c, 0.0).to(krc.dtype), krc).to(tl.float32)
        tl.store(DQR + bhq * n * D + rows[:, None] * D + rd[None, :], dqr * scale, mask=mr[:, None] & md[None, :])
        fi = tl.exp(gq - gprev + cl)
        dql = tl.zeros([C], dtype=tl.float32)
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            q = tl.load(QF + bhq * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            kp = tl.load(KT + bh * n * F + prow[:, None] * F + rk[None, :], mask=mp[:, None] & mk[None, :], other=0.0)
            kc = tl.load(KT + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            h = tl.load(H + bh * NC * F * DV + pi * F * DV + rk[:, None] * DV + rv[None, :],
                        mask=mk[:, None] & mv[None, :], other=0.0)
            z = tl.load(Z + bh * NC * F + pi * F + rk, mask=mk, other=0.0)
            dq = tl.dot(tl.where(lin_p, gm_p, 0.0).to(kp.dtype), kp).to(tl.float32) + \
                tl.dot(tl.where(lin_c, gm_c, 0.0).to(kc.dtype), kc).to(tl.float32)
            dq += fi[:, None] * (tl.dot(do.to(q.dtype), tl.trans(h.to(q.dtype))).to(tl.float32) -
                                 delta[:, None] * z[None, :])
            tl.store(DQF + bhq * n * F + rows[:, None] * F + rk[None, :], dq, mask=mr[:, None] & mk[None, :])
            dql += tl.sum(q.to(tl.float32) * dq, 1)
        # dql is the linear pairs' sum of P dP; with Delta exact it equals minus the window's. Each form carries
        # the error of the saved (16-bit) output in Delta times the other part's share, so the true gradient,
        # s (1 - s) (dO.o_lin - dO.o_win), which vanishes as either share does, is lost in it; the blend
        # s * linear - (1 - s) * window cancels Delta exactly (and the 16-bit state's rounding is scaled by s).
        dql = s_win * dql - (1.0 - s_win) * pdp_win
        tl.store(DQL + bhq * n + rows, dql, mask=mr)

    @triton.jit
    def _win_dkv(QF, KT, V, QR, KR, VALID, G, G0, DH, DZ, DO, DELTA, LSE, CL, DKT, DKR, DV_, n, NC, GROUP, HQ, W,
                 scale, F: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 BD: tl.constexpr, BV: tl.constexpr, HAS_VALID: tl.constexpr):
        """Per key chunk ``c`` and KV head, over its query heads and the queries of chunks ``c`` and ``c + 1``
        (the others read these keys through the state: ``DH``/``DZ``, the gradient of the state after chunk
        ``c``): ``dv_j = sum_i P_ij dO_i + w_j kt_j dH``, ``dk_j = scale sum_win E dP q_i``, ``dkt_j = sum_lin E
        dP qf_i + w_j (dH v_j + dz)``, ``w_j = exp(G_end - G_j)``. No atomics."""
        c = tl.program_id(0)
        bh = tl.program_id(1)
        bi = (bh * GROUP) // HQ
        rc = tl.arange(0, C)
        rows = c * C + rc
        mr = rows < n
        rv = tl.arange(0, BV)
        mv = rv < DV
        rd = tl.arange(0, BD)
        md = rd < D
        ok = _key_ok(VALID, bi, n, rows, mr, HAS_VALID)
        v = tl.load(V + bh * n * DV + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        kr = tl.load(KR + bh * n * D + rows[:, None] * D + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
        g = tl.load(G + bh * n + rows, mask=mr, other=0.0).to(tl.float32)
        last = tl.minimum(c * C + C, n) - 1
        ge = tl.load(G + bh * n + last).to(tl.float32)
        w = tl.where(mr, tl.exp(ge - g), 0.0)
        dv = tl.zeros([C, BV], dtype=tl.float32)
        dkr = tl.zeros([C, BD], dtype=tl.float32)
        for hh in range(GROUP * 2):
            bhq = bh * GROUP + hh // 2
            t = hh % 2  # the queries of chunk c (t = 0) or c + 1
            qrow = (c + t) * C + rc
            mq = qrow < n
            dist = rc[:, None] - rc[None, :] + t * C
            win = (dist >= 0) & (dist < W) & ok[None, :] & mq[:, None]
            lin = (dist >= W) & mr[None, :] & mq[:, None]
            lse = tl.load(LSE + bhq * n + qrow, mask=mq, other=float("inf"))
            cl = tl.load(CL + bhq * n + qrow, mask=mq, other=float("-inf"))
            delta = tl.load(DELTA + bhq * n + qrow, mask=mq, other=0.0)
            gq = _gate_q(G, G0, bh, n, qrow, mq, W)
            do = tl.load(DO + bhq * n * DV + qrow[:, None] * DV + rv[None, :], mask=mq[:, None] & mv[None, :],
                         other=0.0)
            a = tl.zeros([C, C], dtype=tl.float32)
            for k0 in range(0, F, BK):
                rk = k0 + tl.arange(0, BK)
                mk = rk < F
                q = tl.load(QF + bhq * n * F + qrow[:, None] * F + rk[None, :], mask=mq[:, None] & mk[None, :],
                            other=0.0)
                k = tl.load(KT + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :],
                            other=0.0)
                a += tl.dot(q, tl.trans(k)).to(tl.float32)
            qr = tl.load(QR + bhq * n * D + qrow[:, None] * D + rd[None, :], mask=mq[:, None] & md[None, :], other=0.0)
            e = _win_e(qr, kr, lse, cl, gq, g, win, lin, scale)
            dv += tl.dot(tl.trans(tl.where(win, e, e * a).to(do.dtype)), do).to(tl.float32)
            gm = tl.where(win, e * _win_dp(do, v, delta), 0.0)
            dkr += tl.dot(tl.trans(gm.to(qr.dtype)), qr).to(tl.float32)
        tl.store(DKR + bh * n * D + rows[:, None] * D + rd[None, :], dkr * scale, mask=mr[:, None] & md[None, :])
        for k0 in range(0, F, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < F
            k = tl.load(KT + bh * n * F + rows[:, None] * F + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            dh = tl.load(DH + bh * NC * F * DV + c * F * DV + rk[:, None] * DV + rv[None, :],
                         mask=mk[:, None] & mv[None, :], other=0.0)
            dz = tl.load(DZ + bh * NC * F + c * F + rk, mask=mk, other=0.0)
            dv += w[:, None] * tl.dot(k, dh.to(k.dtype)).to(tl.float32)
            dk = w[:, None] * (tl.dot(v, tl.trans(dh.to(v.dtype))).to(tl.float32) + dz[None, :])
            for hh in range(GROUP * 2):
                bhq = bh * GROUP + hh // 2
                t = hh % 2
                qrow = (c + t) * C + rc
                mq = qrow < n
                dist = rc[:, None] - rc[None, :] + t * C
                lin = (dist >= W) & mr[None, :] & mq[:, None]
                cl = tl.load(CL + bhq * n + qrow, mask=mq, other=float("-inf"))
                delta = tl.load(DELTA + bhq * n + qrow, mask=mq, other=0.0)
                gq = _gate_q(G, G0, bh, n, qrow, mq, W)
                do = tl.load(DO + bhq * n * DV + qrow[:, None] * DV + rv[None, :], mask=mq[:, None] & mv[None, :],
                             other=0.0)
                q = tl.load(QF + bhq * n * F + qrow[:, None] * F + rk[None, :], mask=mq[:, None] & mk[None, :],
                            other=0.0)
                x = gq[:, None] - g[None, :] + cl[:, None]
                gm = tl.where(lin, tl.exp(tl.where(lin, x, 0.0)) * _win_dp(do, v, delta), 0.0)
                dk += tl.dot(tl.trans(gm.to(q.dtype)), q).to(tl.float32)
            tl.store(DKT + bh * n * F + rows[:, None] * F + rk[None, :], dk, mask=mr[:, None] & mk[None, :])
        tl.store(DV_ + bh * n * DV + rows[:, None] * DV + rv[None, :], dv, mask=mr[:, None] & mv[None, :])


def _pow2(x: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(x)))


def _forward(qf, kt, v, G, G0, S0, chunk):
    b, hq, n, f = qf.shape
    hkv, dv = kt.shape[1], v.shape[-1]
    C = _pow2(chunk, 16, 128)
    nc = -(-n // C)
    dev = qf.device
    H = torch.empty(b * hkv, nc, f, dv, dtype=torch.float32, device=dev)
    Z = torch.empty(b * hkv, nc, f, dtype=torch.float32, device=dev)
    SF = torch.empty(b, hkv, f, dv, dtype=torch.float32, device=dev)
    ZF = torch.empty(b, hkv, f, dtype=torch.float32, device=dev)
    has_s0 = S0 is not None
    s0 = S0[..., :dv].float().contiguous() if has_s0 else SF
    z0 = S0[..., dv].float().contiguous() if has_s0 else ZF
    BK, BV = _pow2(f), _pow2(dv)
    _states[(b * hkv, triton.cdiv(f, BK), triton.cdiv(dv, BV))](
        kt, v, G, G0, s0, z0, H, Z, SF, ZF, n, nc, F=f, DV=dv, C=C, BK=BK, BV=BV, HAS_S0=has_s0)
    num = torch.empty(b, hq, n, dv, dtype=torch.float32, device=dev)
    den = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
    _outputs[(nc, b * hq, triton.cdiv(dv, BV))](
        qf, kt, v, G, G0, H, Z, num, den, n, nc, hq // hkv, F=f, DV=dv, C=C, BK=BK, BV=BV)
    return num, den, torch.cat([SF, ZF[..., None]], -1), H, Z


def _prepare(qf, kt, v, G, G0):
    dt = qf.dtype if qf.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return (qf.to(dt).contiguous(), kt.to(dt).contiguous(), v.to(dt).contiguous(), G.float().contiguous(),
            G0.float().contiguous())


def chunk_core_fused(qf, kt, v, G, G0, S0, *, chunk: int = 64, gated: bool = True):
    """:func:`.chunked.chunk_core` on the Triton kernels (forward), same arguments and results; float32
    results and state. ``chunk`` is rounded to a power of two >= 16."""
    return _forward(*_prepare(qf, kt, v, G, G0), S0, chunk)[:3]


def _backward(qf, kt, v, G, G0, H, Z, dnum, dden, dS, chunk):
    """(dq, dk, dv, dS0) of the chunk computation, on the kernels."""
    b, hq, n, f = qf.shape
    hkv, dv = kt.shape[1], v.shape[-1]
    C = _pow2(chunk, 16, 128)
    nc = -(-n // C)
    dev = qf.device
    BK, BV = _pow2(f), _pow2(dv, 16, 128)
    dnum = dnum.to(qf.dtype).contiguous()
    dden = dden.float().contiguous()
    dsf = dS[..., :dv].float().contiguous()
    dzf = dS[..., dv].float().contiguous()
    DH = torch.empty(b * hkv, nc, f, dv, dtype=torch.float32, device=dev)
    DZ = torch.empty(b * hkv, nc, f, dtype=torch.float32, device=dev)
    g = hq // hkv
    _states_bwd[(b * hkv, triton.cdiv(f, BK), triton.cdiv(dv, _pow2(dv)))](
        qf, dnum, dden, G, G, G, G0, dsf, dzf, DH, DZ, n, nc, g, F=f, DV=dv, C=C, BK=BK, BV=_pow2(dv), LAG=0,
        HAS_ROW=False)
    dq = torch.empty(b, hq, n, f, dtype=qf.dtype, device=dev)  # float32 sums, stored in the input's dtype
    _dq[(nc, b * hq)](qf, kt, v, G, G0, H, Z, dnum, dden, dq, n, nc, g, F=f, DV=dv, C=C, BK=BK, BV=BV)
    dk = torch.empty(b, hkv, n, f, dtype=kt.dtype, device=dev)
    dvv = torch.empty(b, hkv, n, dv, dtype=v.dtype, device=dev)
    _dkv[(nc, b * hkv)](qf, kt, v, G, DH, DZ, dnum, dden, dk, dvv, n, nc, g, F=f, DV=dv, C=C, BK=BK, BV=BV)
    return dq, dk, dvv


class _ChunkCore(torch.autograd.Function):
    """The chunk computation on the kernels, forward and backward (the log-scales ``G`` and an initial state
    take no gradient here: :func:`causal_parts_fused` sends those cases to PyTorch)."""

    @staticmethod
    def forward(ctx, qf, kt, v, G, G0, chunk):
        args = _prepare(qf, kt, v, G, G0)
        num, den, S, H, Z = _forward(*args, None, chunk)
        ctx.save_for_backward(*args, H, Z)
        ctx.chunk, ctx.dtypes = chunk, (qf.dtype, kt.dtype, v.dtype)
        return num, den, S

    @staticmethod
    def backward(ctx, dnum, dden, dS):
        qf, kt, v, G, G0, H, Z = ctx.saved_tensors
        dq, dk, dv = _backward(qf, kt, v, G, G0, H, Z, dnum, dden, dS, ctx.chunk)
        tq, tk, tv = ctx.dtypes
        return dq.to(tq), dk.to(tk), dv.to(tv), None, None, None


def _fits(qf, kt, v) -> bool:
    return qf.shape[-1] >= 16 and 16 <= v.shape[-1] <= 128 and qf.dtype != torch.float64


def causal_parts_fused(qf, kt, v, G, G0, S0, *, chunk: int = 64, gated: bool = True):
    """The ``core`` for :func:`.chunked.causal_parts`: the kernels where the shapes suit tensor cores (feature
    and value widths >= 16, value width <= 128, not float64); with an initial state (decoding, prefill with a
    cache) the forward kernels without autograd; else :func:`.chunked.chunk_core`."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qf, kt, v, G, G0, S0))
    if not _fits(qf, kt, v) or (grad and (S0 is not None or G.requires_grad or G0.requires_grad)):
        return chunk_core(qf, kt, v, G, G0, S0, chunk=chunk, gated=gated)
    if S0 is not None or not grad:
        return chunk_core_fused(qf, kt, v, G, G0, S0, chunk=chunk)
    return _ChunkCore.apply(qf, kt, v, G, G0, chunk)


# ---------------------------------------------------------------------------------------------- the window hybrid
MAX_WINDOW = 128  # a query's window lies in its own chunk and the one before: chunks of up to 128 keys


def window_fits(qf, v, q, window: int) -> str | None:
    """None when :func:`window_fused` takes these shapes, else why not (the op then computes the window part in
    PyTorch and only the linear part on the kernels)."""
    if window > MAX_WINDOW:
        return (f"window={window}: the fused window kernels take window <= {MAX_WINDOW} (a query's window keys must "
                f"lie in its own chunk and the previous one, chunks of at most {MAX_WINDOW} keys)")
    if not _fits(qf, qf, v) or not 16 <= q.shape[-1] <= 128:
        return "feature width >= 16, value and head widths in [16, 128], not float64"
    return None


def _launch(C: int) -> dict:
    """Launch options of the window kernels. They hold several [C, C] float32 tiles: 8 warps (compiled for sm_90,
    chunks of 64 spill 300-700 bytes a thread with 8 warps against 1-1.3 KB with 4); chunks of 128 without
    software pipelining, so that the dots' operands fit in shared memory."""
    return dict(num_warps=8, num_stages=1) if C > 64 else dict(num_warps=8)


def _win_chunk(chunk: int, window: int) -> int:
    return max(_pow2(chunk, 16, 128), triton.next_power_of_2(window))


def _win_forward(qf, kt, v, q, k, G, G0, S0, valid, q_log, scale, W, chunk):
    b, hq, n, f = qf.shape
    hkv, dv, d = kt.shape[1], v.shape[-1], q.shape[-1]
    C = _win_chunk(chunk, W)
    nc = -(-n // C)
    dev = qf.device
    H = torch.empty(b * hkv, nc, f, dv, dtype=torch.float32, device=dev)
    Z = torch.empty(b * hkv, nc, f, dtype=torch.float32, device=dev)
    SF = torch.empty(b, hkv, f, dv, dtype=torch.float32, device=dev)
    ZF = torch.empty(b, hkv, f, dtype=torch.float32, device=dev)
    has_s0 = S0 is not None
    s0 = S0[..., :dv].float().contiguous() if has_s0 else SF
    z0 = S0[..., dv].float().contiguous() if has_s0 else ZF
    BK, BV, BD = _pow2(f), _pow2(dv), _pow2(d, 16, 128)
    _states[(b * hkv, triton.cdiv(f, BK), triton.cdiv(dv, BV))](
        kt, v, G, G0, s0, z0, H, Z, SF, ZF, n, nc, F=f, DV=dv, C=C, BK=BK, BV=BV, HAS_S0=has_s0)
    out = torch.empty(b, hq, n, dv, dtype=qf.dtype, device=dev)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
    cl = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
    _win_fwd[(nc, b * hq, triton.cdiv(dv, BV))](
        qf, kt, v, q, k, q_log if q_log is not None else G, valid if valid is not None else G, G, G0, H, Z, out, lse,
        cl, n, nc, hq // hkv, hq, W, scale, F=f, D=d, DV=dv, C=C, BK=BK, BD=BD, BV=BV, HAS_QL=q_log is not None,
        HAS_VALID=valid is not None, **_launch(C))
    return out, lse, cl, H, Z


def _win_backward(qf, kt, v, q, k, G, G0, valid, scale, W, chunk, out, lse, cl, H, Z, dout):
    b, hq, n, f = qf.shape
    hkv, dv, d = kt.shape[1], v.shape[-1], q.shape[-1]
    C = _win_chunk(chunk, W)
    nc = -(-n // C)
    dev, g = qf.device, hq // hkv
    BK, BV, BD = _pow2(f), _pow2(dv, 16, 128), _pow2(d, 16, 128)
    dout = dout.to(qf.dtype).contiguous()
    delta = (dout.float() * out.float()).sum(-1)
    ndelta = -delta
    zero, zero_z = (torch.zeros(b, hkv, f, *e, dtype=torch.float32, device=dev) for e in ((dv,), ()))
    DH = torch.empty(b * hkv, nc, f, dv, dtype=torch.float32, device=dev)
    DZ = torch.empty(b * hkv, nc, f, dtype=torch.float32, device=dev)
    Gq = torch.cat([G0[..., None].expand(b, hkv, min(W, n)), G[..., : max(n - W, 0)]], -1).contiguous()
    _states_bwd[(b * hkv, triton.cdiv(f, BK), triton.cdiv(dv, _pow2(dv)))](
        qf, dout, ndelta, G, Gq, cl, G0, zero, zero_z, DH, DZ, n, nc, g, F=f, DV=dv, C=C, BK=BK,
        BV=_pow2(dv), LAG=1, HAS_ROW=True)
    vmask = valid if valid is not None else G
    dqf = torch.empty(b, hq, n, f, dtype=qf.dtype, device=dev)  # float32 sums, stored in the inputs' dtypes
    dq = torch.empty(b, hq, n, d, dtype=q.dtype, device=dev)
    dql = torch.empty(b, hq, n, dtype=torch.float32, device=dev)
    _win_dq[(nc, b * hq)](qf, kt, v, q, k, vmask, G, G0, H, Z, dout, delta, lse, cl, dqf, dq, dql, n, nc, g, hq, W,
                          scale, F=f, D=d, DV=dv, C=C, BK=BK, BD=BD, BV=BV, HAS_VALID=valid is not None,
                          **_launch(C))
    dkt = torch.empty(b, hkv, n, f, dtype=kt.dtype, device=dev)
    dk = torch.empty(b, hkv, n, d, dtype=k.dtype, device=dev)
    dvv = torch.empty(b, hkv, n, dv, dtype=v.dtype, device=dev)
    _win_dkv[(nc, b * hkv)](qf, kt, v, q, k, vmask, G, G0, DH, DZ, dout, delta, lse, cl, dkt, dk, dvv, n, nc, g, hq,
                            W, scale, F=f, D=d, DV=dv, C=C, BK=BK, BD=BD, BV=BV, HAS_VALID=valid is not None,
                            **_launch(C))
    return dqf, dkt, dvv, dq, dk, dql


class _WindowCore(torch.autograd.Function):
    """The window hybrid on the kernels, forward and backward (``G``, ``G0``: detached stabilisers)."""

    @staticmethod
    def forward(ctx, qf, kt, v, q, k, q_log, G, G0, valid, scale, W, chunk):
        dtypes = (qf.dtype, kt.dtype, v.dtype, q.dtype, k.dtype, None if q_log is None else q_log.dtype)
        qf, kt, v, G, G0 = _prepare(qf, kt, v, G, G0)
        q, k = q.to(qf.dtype).contiguous(), k.to(qf.dtype).contiguous()
        ql = q_log.float().contiguous() if q_log is not None else None
        out, lse, cl, H, Z = _win_forward(qf, kt, v, q, k, G, G0, None, valid, ql, scale, W, chunk)
        ctx.save_for_backward(qf, kt, v, q, k, G, G0, valid, out, lse, cl, H, Z)
        ctx.args, ctx.dtypes = (scale, W, chunk), dtypes
        return out

    @staticmethod
    def backward(ctx, dout):
        qf, kt, v, q, k, G, G0, valid, out, lse, cl, H, Z = ctx.saved_tensors
        scale, W, chunk = ctx.args
        grads = _win_backward(qf, kt, v, q, k, G, G0, valid, scale, W, chunk, out, lse, cl, H, Z, dout)
        tq, tk, tv, tqr, tkr, tql = ctx.dtypes
        dqf, dkt, dv, dq, dk, dql = grads
        return (dqf.to(tq), dkt.to(tk), dv.to(tv), dq.to(tqr), dk.to(tkr), None if tql is None else dql.to(tql),
                None, None, None, None, None, None)


def window_fused(qf, kt, v, q, k, G, G0, S0, *, valid=None, q_log=None, scale: float, window: int,
                 chunk: int = 64) -> torch.Tensor:
    """The whole causal window hybrid on the kernels: ``[b, hq, n, dv]`` normalised outputs (the ``window_fn``
    of :func:`.chunked.linear_attention_chunked`; ``kt``, ``G = -m``, ``G0``, ``S0`` from
    :func:`.chunked.stabilised_keys`). The chunk is ``max(chunk, window)`` rounded to a power of two. With an
    initial state ``S0`` (decoding, prefill with a cache) forward only (no autograd)."""
    vb = valid.to(torch.int8).contiguous() if valid is not None else None
    if S0 is None:
        return _WindowCore.apply(qf, kt, v, q, k, q_log, G, G0, vb, scale, window, chunk)
    qf2, kt2, v2, G2, G02 = _prepare(qf, kt, v, G, G0)
    ql = q_log.float().contiguous() if q_log is not None else None
    return _win_forward(qf2, kt2, v2, q.to(qf2.dtype).contiguous(), k.to(qf2.dtype).contiguous(), G2, G02, S0, vb,
                        ql, scale, window, chunk)[0]
