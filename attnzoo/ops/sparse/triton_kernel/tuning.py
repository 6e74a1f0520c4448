"""Tile configurations of the kernels: which ones fit a call, the one each kernel variant runs, the launch.

A kernel variant (its kind, constexprs, dtype and device) is tuned on its first call: every configuration that fits
is timed with ``triton.testing.do_bench`` and the fastest is kept for the process (with
``SparseKernelOptions(autotune=False)``, or under Triton's interpreter, the first that fits, untimed). Launches (in
:mod:`.autograd`) go through Triton's public ``kernel[grid](*args, **constexprs, **config)``.
"""
from __future__ import annotations

from ..options import sparse_kernel_options
from .codes import Mode
from .kernels import interpreted

__all__ = ["configs_of", "fitting", "choose_config", "tuned_or_first"]

#: (BLOCK_M, BLOCK_N, warps, stages) per kernel kind; the first ones won a 108-config sweep on an H200 (band, d=64)
_SHAPES = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
            (128, 128, 8, 3)],
    "dkdv": [(32, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 4), (64, 128, 8, 3), (32, 128, 8, 4)],
    "dq": [(64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 4, 3),
           (64, 64, 4, 4)],
}
_INTERPRETED = [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)]


def configs_of(kind: str) -> list[dict]:
    """The configurations to try for a kernel kind (``"fwd"``, ``"dq"``, ``"dkdv"``), as launch keyword arguments;
    the first is the default."""
    if interpreted():
        return _INTERPRETED
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in _SHAPES[kind]]


_tuned: dict = {}  # (kernel kind, constexprs, dtype, device, autotune) -> launch keyword arguments


def fitting(kind: str, constexprs: dict) -> list[dict]:
    """The configurations of ``kind`` that fit the call: list mode needs blocks that tile its tiles (the forward and
    dQ: one program per query tile, dK/dV: one per KV tile); band mode takes any."""
    configs = configs_of(kind)
    if constexprs["MODE"] == Mode.BAND:
        return configs
    tile = constexprs["TILE"]
    if kind == "dkdv":
        ok = [c for c in configs if c["BLOCK_N"] == tile and tile % c["BLOCK_M"] == 0]
        fallback = dict(BLOCK_M=min(32, tile), BLOCK_N=tile)
    else:
        ok = [c for c in configs if c["BLOCK_M"] == tile and tile % c["BLOCK_N"] == 0]
        fallback = dict(BLOCK_M=tile, BLOCK_N=min(32, tile))
    return ok or [dict(fallback, num_warps=4, num_stages=1 if interpreted() else 3)]


def choose_config(kind: str, kernel, grid, args: tuple, constexprs: dict, reset=None) -> dict:
    """The launch configuration of this kernel variant: tuned on its first call (each fitting configuration timed
    with ``triton.testing.do_bench``, the fastest kept) unless ``autotune`` is off or only one fits, then the first
    that fits. ``reset()`` runs before each timed launch (buffers a launch must find zeroed)."""
    autotune = sparse_kernel_options().autotune
    key = _key(kind, constexprs, args[0].dtype, args[0].device, autotune)
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    fits = fitting(kind, constexprs)
    cfg = fits[0]
    if autotune and len(fits) > 1 and not interpreted():
        from triton.testing import do_bench

        def timed(c):
            def run():
                if reset is not None:
                    reset()
                kernel[grid(c)](*args, **constexprs, **c)
            try:
                return do_bench(run, warmup=25, rep=100, return_mode="median")
            except Exception:  # noqa: BLE001 - a configuration that does not compile here (resources): not a candidate
                return float("inf")
        times = [timed(c) for c in fits]
        cfg = fits[min(range(len(fits)), key=times.__getitem__)]
        if reset is not None:
            reset()
    _tuned[key] = cfg
    return cfg


def _key(kind: str, constexprs: dict, dtype, device, autotune: bool) -> tuple:
    return kind, tuple(constexprs.items()), dtype, device, autotune


def tuned_or_first(kind: str, constexprs: dict, dtype, device) -> dict:
    """The configuration this kernel variant was tuned to in this process (by an eager call), else the first that
    fits; never times anything (for code traced by ``torch.compile``)."""
    cfg = _tuned.get(_key(kind, constexprs, dtype, device, sparse_kernel_options().autotune))
    return cfg if cfg is not None else fitting(kind, constexprs)[0]
