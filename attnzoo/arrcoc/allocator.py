"""The token budget allocator: how many visual tokens each region gets, from its relevance.

:class:`TokenBudgetAllocator` ``(budget, levels, temperature)`` maps relevance ``[B, R]`` to tokens per region
``[B, R]`` (long), every value one of ``levels``, such that

* the total is exactly ``budget`` with the default levels (every multiple of 16 from 64 to 400: any multiple of
  16 between ``64 R`` and ``400 R`` is reachable), and in general the largest reachable total not above
  ``budget`` (with the square levels ``(64, 144, 256, 400)`` not every total is reachable);
* it is monotone in relevance: a region more relevant than another never gets fewer tokens (equal relevance:
  ties are broken by region index, the earlier region first);
* the split follows the relevance: the target of region ``i`` is its share ``softmax(relevance / temperature)``
  of the total, water-filled into ``[min(levels), max(levels)]`` (what a region cannot take goes to the others);
  each region then gets the level closest to its target that keeps the rest feasible.

How (exact, no search): with ``reach[c][k]``, the set of totals ``k`` regions can make with levels up to
``levels[c]`` (bit sets over multiples of the levels' step), the regions are visited from most to least
relevant; each takes the level closest to its target, among those not above the previous region's, whose
remainder the remaining regions can still make. The best total is the highest bit of ``reach[-1][R]`` not above
the budget. The seed's clamp-then-renormalise and ``.long()`` broke both the bounds and the exact total; this
replaces them.

A budget that is not a multiple of the levels' step (16 for the seed's levels) or lies outside
``[R min(levels), R max(levels)]`` raises a ``ValueError`` naming the budget, the levels and the valid range.
"""
from __future__ import annotations

import bisect
import math
import warnings

import torch
from torch import nn

from ..variants.arrcoc import check_budget, level_step, resolve_levels
from . import allocator_kernel

__all__ = ["TokenBudgetAllocator", "grid_shape"]


def grid_shape(tokens: int, aspect: float = 1.0) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols == tokens`` and ``cols / rows`` closest to ``aspect`` (width / height
    of the region): 80 tokens of a square region are an 8 x 10 grid, 64 an 8 x 8."""
    best = None
    for rows in range(1, tokens + 1):
        if tokens % rows == 0:
            cols = tokens // rows
            err = abs(math.log(cols / rows) - math.log(aspect))
            if best is None or err < best[0] - 1e-12:
                best = (err, rows, cols)
    return best[1], best[2]


def _sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, keepdim, left to right as Python's ``sum`` (a running sum: the same rounding as
    :meth:`TokenBudgetAllocator.allocate` on the CPU, which matters where a target falls on a level midpoint)."""
    return x.cumsum(-1)[..., -1:]


def _fill(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Python's ``min(hi, max(lo, v))`` elementwise, NaN included (it gives lo; ``clamp`` would keep the NaN)."""
    w = torch.where(v > lo, v, lo)
    return torch.where(w < hi, w, hi)


#: targets are snapped to multiples of 1/TARGET_GRID tokens (2**-20: exact in float64) before the closest level is
#: picked, in the reference and in both device paths alike. A target exactly between two levels (equal relevances
#: sharing what is left, e.g. 344 between 336 and 352) is then a tie on every device, broken towards the larger
#: level as documented, instead of by the last bit of ``exp`` (Python's, torch's and Triton's differ by an ulp).
TARGET_GRID = float(2 ** 20)


def _snap(t: float) -> float:
    return math.floor(t * TARGET_GRID + 0.5) / TARGET_GRID


class TokenBudgetAllocator(nn.Module):
    """Tokens per region from relevance (see the module docstring).

    Args:
        budget: visual tokens per image.
        levels: tokens a region may get, strictly increasing (None: every multiple of 16 from 64 to 400).
        temperature: softmax temperature of the budget shares (> 0).
    """

    def __init__(self, budget: int, levels: tuple[int, ...] | None = None, temperature: float = 0.1):
        super().__init__()
        self.levels = resolve_levels(levels)
        check_budget(budget, self.levels)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected a positive float")
        self.budget, self.temperature = int(budget), float(temperature)
        self.step = level_step(self.levels)
        self._units = [t // self.step for t in self.levels]
        self._reach: dict[int, list[list[int]]] = {}
        self._device_tables: dict = {}
        self._kernel_error: str | None = None

    def extra_repr(self) -> str:
        return f"budget={self.budget}, levels={self.levels}, temperature={self.temperature}"

    def best_total(self, regions: int) -> int:
        """The total the allocation of ``regions`` regions reaches: the budget, or the closest below it."""
        check_budget(self.budget, self.levels, regions)
        full = self._reachable(regions)[-1][regions] & ((1 << (self.budget // self.step + 1)) - 1)
        return (full.bit_length() - 1) * self.step

    def _reachable(self, regions: int) -> list[list[int]]:
        """``reach[c][k]``: bit ``s`` set when ``k`` regions with levels up to ``levels[c]`` can total ``s`` steps."""
        got = self._reach.get(regions)
        if got is None:
            below = [1] + [0] * regions  # no level allowed: only 0 regions make a total (0)
            got = []
            for u in self._units:
                row = [1]
                for k in range(1, regions + 1):
                    row.append((row[k - 1] << u) | below[k])
                got.append(row)
                below = row
            self._reach[regions] = got
        return got

    def _targets(self, shares: list[float], total: int) -> list[float]:
        """Water-filling: ``clamp(lam * share, min, max)`` summing to ``total``. The sum is piecewise linear and
        non-decreasing in ``lam`` with breakpoints ``min / share`` and ``max / share``: a binary search over them
        finds the segment, where ``lam`` is solved exactly."""
        lo, hi = self.levels[0], self.levels[-1]

        def filled(lam):
            return [min(hi, max(lo, lam * s)) for s in shares]

        points = sorted({b / s for s in shares if s > 0 for b in (lo, hi)})
        a, b = 0, len(points) - 1  # sum(filled(points[0])) = n lo <= total <= n hi = sum(filled(points[-1]))
        while b - a > 1:
            mid = (a + b) // 2
            a, b = (mid, b) if sum(filled(points[mid])) <= total else (a, mid)
        lam = points[a]
        have = sum(filled(lam))
        inside = (lam + points[b]) / 2  # the regions neither at min nor at max within the segment
        slope = sum(s for s in shares if lo < inside * s < hi)
        if slope > 0 and have < total:
            lam = min(points[b], lam + (total - have) / slope)
        return [_snap(t) for t in filled(lam)]

    def _by_distance(self, target: float, cap: int):
        """Level indices ``0..cap`` from the closest to ``target`` outwards (ties: the larger level first)."""
        hi = bisect.bisect_left(self.levels, target, 0, cap + 1)
        lo = hi - 1
        while lo >= 0 or hi <= cap:
            if hi <= cap and (lo < 0 or self.levels[hi] - target <= target - self.levels[lo]):
                yield hi
                hi += 1
            else:
                yield lo
                lo -= 1

    def allocate(self, relevance: list[float]) -> list[int]:
        """Tokens for one image's regions (plain Python lists)."""
        n = len(relevance)
        total = self.best_total(n)
        reach = self._reachable(n)
        m = max(relevance)
        e = [math.exp((r - m) / self.temperature) for r in relevance]
        targets = self._targets([x / sum(e) for x in e], total)
        order = sorted(range(n), key=lambda i: (-relevance[i], i))
        out, cap, rem = [0] * n, len(self.levels) - 1, total // self.step
        for pos, i in enumerate(order):
            left = n - pos - 1
            for c in self._by_distance(targets[i], cap):
                r = rem - self._units[c]
                if r >= 0 and (reach[c][left] >> r) & 1:
                    out[i], cap, rem = self.levels[c], c, r
                    break
        return out

    def _tables(self, regions: int, device: torch.device):
        """Device constants of :meth:`forward` for ``regions`` regions (made once per count and device): the
        levels (float64 largest first, float64 and long increasing), their units, the smallest and largest,
        the Triton kernel's float64 parameters, and ``take[left]`` ``[C, M]``
        (0/1 uint8, flattened): 1 where a region may take level ``c`` with ``m`` units left to place, i.e.
        ``m - units[c]`` is a total the ``left`` regions after it can make with levels up to ``c``."""
        key = (regions, device)
        got = self._device_tables.get(key)
        if got is None:
            total = self.best_total(regions) // self.step
            reach = self._reachable(regions)
            units = self._units
            ok = torch.zeros(regions, len(units), total + 1, dtype=torch.bool)
            for left in range(regions):
                for c, u in enumerate(units):
                    bits = reach[c][left] & ((1 << (total + 1 - u)) - 1) if u <= total else 0
                    if bits:  # bit s set: the others can make s, so m = s + u may be taken
                        row = bin(bits)[:1:-1]
                        ok[left, c, u:u + len(row)] = torch.frombuffer(bytearray(row, "ascii"), dtype=torch.uint8) == 49
            levels = torch.tensor(self.levels)
            got = (levels.flip(0).to(device, torch.float64), levels.to(device, torch.float64), levels.to(device),
                   torch.tensor(units, device=device), ok.flatten(1).to(device, torch.uint8), total,
                   levels[[0, -1]].to(device, torch.float64),
                   torch.tensor([self.temperature, self.levels[0], self.levels[-1], total * self.step],
                                dtype=torch.float64).to(device))
            self._device_tables[key] = got
        return got

    def forward(self, relevance: torch.Tensor) -> torch.Tensor:
        """``relevance [B, R]`` (or ``[R]``) -> tokens per region, long, same shape and device.

        The same allocation as :meth:`allocate` (row by row; float64 throughout), computed on the relevance's
        device without a host read, so the call can be captured in a CUDA graph: on CUDA one Triton kernel
        (:mod:`.allocator_kernel`), on other accelerators (or without Triton) tensor ops, a fixed number per
        region; on the CPU, where the numbers already are, :meth:`allocate` itself. Non-finite relevance raises on
        the CPU (on a GPU the check would be a host read: NaN there still gives a valid allocation, on the levels
        and with the usual total)."""
        if not isinstance(relevance, torch.Tensor) or relevance.dim() not in (1, 2) or relevance.shape[-1] < 1:
            raise ValueError(f"relevance: expected a tensor [batch, regions] or [regions], got "
                             f"{getattr(relevance, 'shape', type(relevance).__name__)}")
        if relevance.device.type == "cpu":  # the data is on the host: the reference itself, no tensor ops
            rel = relevance.detach().double()
            if not torch.isfinite(rel).all():
                raise ValueError("relevance holds NaN or infinite values")
            rows = rel.reshape(-1, rel.shape[-1]).tolist()
            return torch.tensor([self.allocate(r) for r in rows], dtype=torch.long).reshape(relevance.shape)
        return self._on_device(relevance)

    def _on_device(self, relevance: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` off the host: the Triton kernel on CUDA, else tensor ops (any device, CPU included)."""
        n = relevance.shape[-1]
        flipped, levels64, levels, units, take, total, lohi, params = self._tables(n, relevance.device)
        if relevance.device.type == "cuda" and allocator_kernel.available("cuda") is None \
                and self._kernel_error is None:  # one launch
            try:
                out = allocator_kernel.allocate_kernel(relevance.reshape(-1, n), levels64, units, take, params,
                                                       total_units=total, step=self.step, grid=TARGET_GRID)
                return out.reshape(relevance.shape)
            except Exception as e:  # a Triton that cannot compile it: the tensor ops, said once
                self._kernel_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"arrcoc allocator: the Triton kernel failed ({self._kernel_error[:300]}); using "
                              "tensor ops (same allocations, about a hundred launches per call)", stacklevel=2)
        rel = relevance.detach().reshape(-1, n).double()
        targets = self._device_targets(self._shares(rel), float(total * self.step), lohi)
        # regions from the most to the least relevant (ties: the earlier region first)
        order = torch.sort(rel, dim=-1, descending=True, stable=True).indices
        t = targets.gather(1, order)
        # each region's candidate levels, from the closest to its target outwards (ties: the larger level first)
        dist = (flipped - t[..., None]).abs()  # [B, R, C], levels largest first
        cand = (len(self.levels) - 1) - torch.sort(dist, dim=-1, stable=True).indices  # level indices
        flat = cand * (total + 1)  # index into take[left] = [C, M] flattened
        rem = torch.full_like(rel[:, 0], total, dtype=torch.long)
        cap = torch.full_like(rem, len(self.levels) - 1)
        chosen = []
        for pos in range(n):
            left = n - pos - 1
            ok = take[left].take(flat[:, pos] + rem[:, None]) * (cand[:, pos] <= cap[:, None])
            c = cand[:, pos].gather(1, ok.argmax(-1, keepdim=True))[:, 0]  # the first that fits
            rem = rem - units.take(c)
            cap = c
            chosen.append(c)
        out = torch.empty_like(order).scatter_(1, order, levels.take(torch.stack(chosen, 1)))
        return out.reshape(relevance.shape)

    def _shares(self, rel: torch.Tensor) -> torch.Tensor:
        e = torch.exp((rel - rel.amax(-1, keepdim=True)) / self.temperature)
        return e / _sum(e)

    def _device_targets(self, shares: torch.Tensor, total: float, lohi: torch.Tensor) -> torch.Tensor:
        """:meth:`_targets` for a batch ``[B, R]`` of shares, with tensor ops: the sum at every breakpoint, the
        last breakpoint whose sum is not above ``total``, the exact ``lam`` inside the next segment."""
        lo, hi = float(self.levels[0]), float(self.levels[-1])
        n = shares.shape[-1]
        # breakpoints lo / s and hi / s, sorted; a zero share has none (NaN: sorts last, never counts)
        pos = shares.masked_fill(shares <= 0, float("nan"))
        # a true division, as the reference's b / s (``lo / tensor`` is a reciprocal and a product: off by an ulp)
        points = torch.sort((lohi[:, None] / pos[:, None, :]).flatten(1), -1).values  # [B, 2R]
        sums = _sum(_fill(points[..., None] * shares[:, None, :], lo, hi))[..., 0]  # [B, 2R]
        # the segment [points[a], points[b]]: a the last breakpoint whose sum is not above total (the sum is
        # non-decreasing), but never the largest breakpoint while a smaller one exists (the reference's binary
        # search stops before it, which matters when that breakpoint is inf: a share below 1/inf)
        valid = points == points
        top = points.nan_to_num(nan=float("-inf")).amax(-1, keepdim=True)
        a = torch.minimum(((sums <= total) & valid).sum(-1, keepdim=True), (points < top).sum(-1, keepdim=True))
        a = (a - 1).clamp(0, 2 * n - 1)
        ab = torch.cat([a, (a + 1).clamp_max(2 * n - 1)], -1)
        pab = points.gather(1, ab)
        pa, pb = pab[:, :1], torch.fmax(pab[:, 1:], pab[:, :1])  # fmax: a NaN b (no breakpoint) gives pa
        have = sums.gather(1, a)
        x = (pa + pb) / 2 * shares  # inside the segment: the regions neither at lo nor at hi
        slope = _sum(torch.where((x > lo) & (x < hi), shares, 0.0))
        step = torch.minimum(pb, pa + (total - have) / slope)  # slope 0: +-inf or NaN, not taken below
        lam = torch.where((slope > 0) & (have < total), step, pa)
        return torch.floor(_fill(lam * shares, lo, hi) * TARGET_GRID + 0.5) / TARGET_GRID  # as _snap
