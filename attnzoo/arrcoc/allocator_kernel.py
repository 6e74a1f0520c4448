"""The token budget allocator as one Triton kernel (CUDA): :meth:`TokenBudgetAllocator.forward`'s fast path.

The tensor-op path costs about a hundred small launches per call (water-filling, sorting, one step per region);
on a GPU at one image the launches, not the arithmetic, set the time. Here one program per image does it all in
float64 registers, the same steps in the same order as :meth:`TokenBudgetAllocator.allocate` (the plain-Python
reference): sums are running sums in region order (Python's ``sum``), so targets that fall exactly on a level
midpoint round the same way; the breakpoints are walked instead of sorted (the segment is the largest breakpoint
whose sum is not above the total and the smallest above it). The feasibility table (``take[left][c][m]``) is the
allocator's, read from global memory. One launch, no host read: capturable in a CUDA graph.

Tested under Triton's interpreter on the CPU against the Python reference (tests/test_arrcoc_speed.py) and
compiled on the GPU (``-m gpu``).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the tensor-op path serves without Triton
    triton = None

__all__ = ["available", "allocate_kernel"]


def available(device_type: str) -> str | None:
    """None if the kernel can run on ``device_type`` here, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's interpreter), inputs are on {device_type}"
    return None


if triton is not None:
    from ..ops.sparse.triton_kernel import kernels as _sparse_kernels  # noqa: F401  (the interpreter's index shim)

    @triton.jit
    def _pick(vec, offs, i):
        """``vec[i]`` (exact: one value plus zeros)."""
        return tl.sum(tl.where(offs == i, vec, 0.0), 0)

    @triton.jit
    def _fill(v, lo, hi):
        """Python's ``min(hi, max(lo, v))``, NaN included (it gives lo)."""
        w = tl.where(v > lo, v, lo)
        return tl.where(w < hi, w, hi)

    @triton.jit
    def _running_sum(vec, offs, n):
        acc = tl.sum(tl.where(offs == 0, vec, 0.0), 0)
        for i in range(1, n):
            acc += _pick(vec, offs, i)
        return acc

    @triton.jit
    def _allocate(REL, LEVELS, UNITS, TAKE, PARAMS, OUT, R, C, M, total_units, step, BR: tl.constexpr,
                  BC: tl.constexpr, GRID: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        # float64 scalars come from memory: a Python float argument would be a float32
        temperature = tl.load(PARAMS)
        lo = tl.load(PARAMS + 1)
        hi = tl.load(PARAMS + 2)
        total = tl.load(PARAMS + 3)
        offs = tl.arange(0, BR)
        rmask = offs < R
        rel = tl.load(REL + row * R + offs, mask=rmask, other=0.0).to(tl.float64)
        # shares: softmax(relevance / temperature), normalised by the running sum
        m = tl.max(tl.where(rmask, rel, float("-inf")), 0)
        e = tl.where(rmask, tl.exp((rel - m) / temperature), 0.0)
        s = e / _running_sum(e, offs, R)
        # water-filling: the segment [pa, pb] of lam around the total. As the reference's binary search over the
        # sorted breakpoints: pa the largest breakpoint below the largest one (top) whose sum is not above the
        # total (top itself only when it is the only one), pb the smallest above the total, else top
        top = tl.max(tl.where(rmask & (s > 0), hi / s, float("-inf")), 0)
        pa = tl.full([], float("-inf"), tl.float64)
        have = tl.zeros([], tl.float64)
        pb = top
        for j in range(2 * R):
            sj = _pick(s, offs, j % R)
            if sj > 0:
                p = tl.where(j < R, lo, hi) / sj
                f = _running_sum(_fill(p * s, lo, hi), offs, R)
                if f <= total:
                    if (p > pa) & (p < top):
                        pa = p
                        have = f
                else:
                    pb = tl.minimum(pb, p)
        if pa == float("-inf"):  # one breakpoint only
            pa = top
            have = _running_sum(_fill(top * s, lo, hi), offs, R)
        x = (pa + pb) / 2 * s
        slope = _running_sum(tl.where((x > lo) & (x < hi), s, 0.0), offs, R)
        lam = pa
        if (slope > 0) & (have < total):
            lam = tl.minimum(pb, pa + (total - have) / slope)
        targets = tl.floor(_fill(lam * s, lo, hi) * GRID + 0.5) / GRID  # snapped as the reference's (_snap)
        # the regions from the most to the least relevant (ties: the earlier first), each the level closest to
        # its target (ties: the larger) among those up to the previous one's whose remainder stays reachable
        coffs = tl.arange(0, BC)
        cmask = coffs < C
        levels = tl.load(LEVELS + coffs, mask=cmask, other=0.0)
        visited = offs >= R
        key = tl.where(rel != rel, float("-inf"), rel)  # NaN relevance: last (the allocation stays valid)
        rem = tl.zeros([], tl.int64) + total_units
        cap = tl.zeros([], tl.int32) + (C - 1)
        for pos in range(R):
            left = R - pos - 1
            cand = tl.where(visited, float("-inf"), key)
            best = tl.max(cand, 0)
            i = tl.min(tl.where((visited == 0) & (cand == best), offs, BR), 0)
            t = _pick(targets, offs, i)
            ok = cmask & (coffs <= cap)
            fits = tl.load(TAKE + left * C * M + coffs * M + rem, mask=ok, other=0)
            ok = ok & (fits != 0)
            d = tl.abs(levels - t)
            d = tl.where(d != d, 0.0, d)  # a NaN target: the largest level that fits
            d = tl.where(ok, d, float("inf"))
            dmin = tl.min(d, 0)
            c = tl.max(tl.where(ok & (d == dmin), coffs, -1), 0)
            u = tl.load(UNITS + c)
            rem = rem - u
            cap = c
            tl.store(OUT + row * R + i, u * step)
            visited = visited | (offs == i)


def allocate_kernel(relevance: torch.Tensor, levels: torch.Tensor, units: torch.Tensor, take: torch.Tensor,
                    params: torch.Tensor, *, total_units: int, step: int, grid: float) -> torch.Tensor:
    """Tokens per region ``[B, R]`` (long) for ``relevance [B, R]``: ``levels`` float64 ``[C]`` (increasing),
    ``units`` long ``[C]`` (levels / step), ``take`` uint8 ``[R, C * (total_units + 1)]``, ``params`` float64
    ``(temperature, min level, max level, total tokens)`` (:meth:`TokenBudgetAllocator._tables`), ``grid`` the
    targets' snapping grid (``allocator.TARGET_GRID``, a power of two: exact as a constant); nothing is read from the
    device."""
    b, r = relevance.shape
    c = levels.shape[0]
    out = torch.empty(b, r, dtype=torch.long, device=relevance.device)
    _allocate[(b,)](relevance.detach().contiguous(), levels, units, take, params, out, r, c, total_units + 1,
                    total_units, step, BR=max(2, triton.next_power_of_2(r)), BC=max(2, triton.next_power_of_2(c)), GRID=grid)
    return out
