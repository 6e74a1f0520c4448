"""Launching the sparse family's autotuned Triton kernels with little host time.

The kernels run for about 0.1 ms, and Triton's own launch path (``JITFunction.run``: binding ~50 arguments, their
specialization, the cache lookup, the check of the kernel's globals) takes about 55 µs of host time per launch on
an H200 host; a forward + backward of three or four launches is then bound by the host unless the GPU is kept busy.
:func:`launch` does two things:

1. **The config.** The first launch per (kernel, constexprs, dtype, device) goes through Triton's autotuner (with
   ``ATTNZOO_SPARSE_AUTOTUNE=0``: the first config that fits, no tuning); later ones reuse the config it chose.
2. **The launch.** The first launch per *argument signature* goes through Triton's ``JITFunction`` (which compiles
   or finds the kernel); later ones call the ``CompiledKernel`` it returned directly (about 20 µs). The signature is
   finer than Triton's specialization (every scalar by value, every tensor by dtype and 16-byte alignment, plus the
   current device; a TMA descriptor by dtype, block, shape and strides), so two launches with one signature always
   run the same compiled kernel.

A config's ``pre_hook`` (which Triton's autotuner runs before launching that config) runs before every launch here
too: the band forward sets its TMA descriptors' block shape in it.

The direct call uses Triton's launcher (``CompiledKernel.run``), which is internal to Triton (3.6 measured). Where
it is unavailable or raises, attnzoo warns once and goes back to Triton's path for good. It is also skipped under
Triton's interpreter, while a Triton launch hook is installed (profilers such as proton), and with
``ATTNZOO_TRITON_FAST_LAUNCH=0``.
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    from triton import knobs as _knobs  # where Triton keeps its launch hooks (3.4+)
except ImportError:  # no Triton, or one without knobs: Triton's own launch path only
    _knobs = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:
    _TensorDescriptor = None

__all__ = ["launch"]

_tuned: dict = {}
_compiled: dict = {}
_MAX_COMPILED = 1024  # argument signatures kept (one per shape and stride pattern); cleared when full
_state = {"fast": True}


def _config(kernel, grid, args, constexprs: dict):
    """(the config for this launch, whether the autotuner already launched it)."""
    key = (kernel, tuple(constexprs.items()), args[0].dtype, args[0].device)
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg, False
    if os.environ.get("ATTNZOO_SPARSE_AUTOTUNE", "1") == "0":  # the first config that fits
        prune = getattr(kernel, "early_config_prune", None)
        fits = prune(kernel.configs, dict(zip(kernel.fn.arg_names, args)), **constexprs) if prune else kernel.configs
        cfg = _tuned[key] = fits[0].all_kwargs()
        return cfg, False
    kernel[grid](*args, **constexprs)
    cfg = _tuned[key] = kernel.best_config.all_kwargs()
    return cfg, True


def _fast_enabled() -> bool:
    """Whether this launch may call the compiled kernel directly (checked per launch: switches and hooks can
    change while the process runs)."""
    if _knobs is None or not _state["fast"] or os.environ.get("ATTNZOO_TRITON_FAST_LAUNCH", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    hooks = _knobs.runtime
    return not _hooked(hooks.launch_enter_hook) and not _hooked(hooks.launch_exit_hook)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is installed: Triton 3.6 keeps a chain that is never None (``HookChain``,
    empty ``calls`` when nothing is hooked); earlier versions a callable or None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _args_key(args) -> tuple:
    """What of the launch arguments selects the compiled kernel: a tensor's dtype and 16-byte alignment, a TMA
    descriptor's dtype, block, shape and strides, any other value itself. (One loop, no call per argument: it runs
    on every launch.)"""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif _TensorDescriptor is not None and type(a) is _TensorDescriptor:
            key.append(("desc", a.base.dtype, tuple(a.block_shape), tuple(a.shape), tuple(a.strides), a.padding))
        else:
            key.append(a)
    return tuple(key)


def _raw_stream(device: int) -> int:
    """The current CUDA stream's handle on ``device`` (what Triton's own launch path reads)."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream


def launch(kernel, grid, args: tuple, constexprs: dict, cfg: dict | None = None) -> dict:
    """Launch ``kernel`` (a ``triton.autotune``-wrapped JIT function) on ``grid`` (a tuple, or a function of the
    config's meta-parameters) with the positional ``args`` and keyword ``constexprs``; return the config it ran
    (tile sizes, warps, stages). ``cfg``: run this config instead of the tuned one (a second launch that must use
    the tiles of a first)."""
    if cfg is None:
        cfg, done = _config(kernel, grid, args, constexprs)
        if done:
            return cfg
    fn = kernel.fn
    hook = kernel.configs[0].pre_hook if getattr(kernel, "configs", None) else None
    if hook is not None:  # what the autotuner runs before a launch of a config (e.g. set descriptor blocks)
        hook({**dict(zip(fn.arg_names, args)), **constexprs, **cfg})
    if not _fast_enabled():
        fn[grid](*args, **constexprs, **cfg)
        return cfg
    device = torch.cuda.current_device()
    sig = (fn, device, tuple(constexprs.items()), tuple(cfg.items()), _args_key(args))
    entry = _compiled.get(sig)
    if entry is None:
        compiled = fn[grid](*args, **constexprs, **cfg)  # Triton's path: compiles or finds the kernel
        values = {**constexprs, **cfg}
        names = fn.arg_names[len(args):]
        if len(_compiled) >= _MAX_COMPILED:
            _compiled.clear()
        _compiled[sig] = (compiled, tuple(values[n] for n in names)) if all(n in values for n in names) else False
        return cfg
    if entry is False:  # a signature the direct call cannot serve
        fn[grid](*args, **constexprs, **cfg)
        return cfg
    compiled, tail = entry
    g = grid(cfg) if callable(grid) else grid
    try:
        compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
                     _raw_stream(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)
    except (TypeError, ValueError, AttributeError, IndexError) as e:  # raised before anything was launched
        _state["fast"] = False
        warnings.warn(f"attnzoo: the direct launch of Triton kernels failed ({type(e).__name__}: {e}); using "
                      "Triton's launch path from now on (slower on the host). Set ATTNZOO_TRITON_FAST_LAUNCH=0 to "
                      "silence this.", RuntimeWarning, stacklevel=2)
        fn[grid](*args, **constexprs, **cfg)
    return cfg
