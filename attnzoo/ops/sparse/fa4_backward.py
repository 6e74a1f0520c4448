"""The backward of band patterns through FlashAttention-4's local-attention kernel, when it is installed.

``sliding_window`` (and ``longformer`` without global tokens) is FlashAttention's *local* attention:
query ``i`` keeps key ``j`` when ``i - left <= j <= i + right``. FlashAttention-4 (the ``flash-attn-4``
package, imported as ``flash_attn.cute``) has a warp-specialised Hopper backward for it (one kernel that
writes dK/dV and adds dQ in float32 with atomics, FlashAttention-3's design). On an H200 at N=16384,
±256, 12 heads, head_dim 64 it takes 237 µs (its kernel 187 µs plus 47 µs of pre/post-processing),
against 288-298 µs for attnzoo's dQ and dK/dV kernels (``benchmarks/results/sparse-h200.md``). Its forward
is no faster than attnzoo's (98.5 against 98.6 µs; causal 82 against 67), so the forward stays attnzoo's
and only the backward is handed over: it reads the forward's output and log-sum-exp.

Used by the ``triton`` sparse backend's backward when :func:`fa4_backward_reason` returns None at the forward
(which then writes the natural-log LSE this backward reads; the choice holds for that call's backward):

* a band pattern with no global tokens and no key padding;
* float16/bfloat16 on a Hopper GPU (compute capability 9.x, where it was measured), head_dim a multiple
  of 8 up to 256;
* ``torch.are_deterministic_algorithms_enabled()`` is off (the float32 atomics that add dQ make its
  result vary in the last bits from run to run; attnzoo's kernels are deterministic);
* ``ATTNZOO_SPARSE_FA4`` is not ``0`` in the environment;
* ``flash_attn.cute`` imports and has not failed before in this process.

It calls ``flash_attn.cute.interface._flash_attn_bwd``, the function behind FlashAttention-4's own
autograd backward (there is no public backward-only entry point), and was measured with
flash-attn-4 4.0.0b36. If the call raises (another version with another signature, an unsupported
shape), attnzoo warns once, computes this backward with its own kernels and does not try again in
this process. Memory: FlashAttention's backward holds a float32 copy of dQ (twice the bytes of q) on
top of what attnzoo's kernels use. Time: the first backward of each shape signature compiles FlashAttention's
kernels (about 3-6 s on the H200; ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` keeps them on disk), and its
Python wrapper adds about 0.08 ms of host time per call. Where flash-attn-4 is installed but does not import, one
warning says why.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__all__ = ["band_backward_reason", "fa4_backward_reason", "fa4_band_backward", "which_band_backward"]

_state: dict = {}  # "module": the imported interface, or "failed": why it cannot be used in this process


def _interface():
    """``flash_attn.cute.interface``, or None with the reason kept in ``_state["failed"]``."""
    if "module" in _state or "failed" in _state:
        return _state.get("module")
    try:
        from flash_attn.cute import interface
        if not callable(getattr(interface, "_flash_attn_bwd", None)):
            raise ImportError("flash_attn.cute.interface has no _flash_attn_bwd")
    except Exception as e:  # noqa: BLE001 - any import failure (missing package, CUDA toolkit flavour) means "not here"
        _state["failed"] = f"flash_attn.cute does not import ({type(e).__name__}: {str(e)[:200]})"
        if _installed():  # there but broken: say so once (absent: silent, attnzoo's kernels are the default)
            warnings.warn(f"attnzoo: flash-attn-4 is installed but {_state['failed']}; the band backward runs on "
                          "attnzoo's own kernels", RuntimeWarning, stacklevel=4)
        return None
    _state["module"] = interface
    return interface


def _installed() -> bool:
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def band_backward_reason(*, band: bool, n_global: int, has_padding: bool, device_type: str,
                         capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int, lo: int, hi: int,
                         deterministic: bool, env: str | None) -> str | None:
    """Why FlashAttention-4's backward cannot take a call with these facts (None: it can). Pure, for tests."""
    if env == "0":
        return "ATTNZOO_SPARSE_FA4=0"
    if not band or n_global:
        return "not a pure band pattern (global tokens, or a listed layout)"
    if has_padding:
        return "key padding (FlashAttention's local attention takes none here)"
    if device_type != "cuda":
        return f"device {device_type} (needs CUDA)"
    if capability is None or capability[0] != 9:
        return f"compute capability {capability} (used on 9.x, where it was measured)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (needs float16 or bfloat16)"
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return f"head_dim {head_dim} (needs a multiple of 8 in 8..256)"
    if lo > 0 or hi < 0:
        return f"band {lo}..{hi} does not hold the diagonal"
    if deterministic:
        return "torch.use_deterministic_algorithms is on (its dQ adds with float32 atomics)"
    return None


def fa4_backward_reason(q: torch.Tensor, *, band: bool, n_global: int, lo: int, hi: int,
                        has_padding: bool) -> str | None:
    """None when :func:`fa4_band_backward` serves the backward of this call (see the module docstring), else
    why not. ``band``: the kernels walk a band of keys ``lo <= j - i <= hi`` (plus ``n_global`` global keys)."""
    cuda = q.device.type == "cuda"
    why = band_backward_reason(
        band=band, n_global=n_global, has_padding=has_padding, device_type=q.device.type,
        capability=torch.cuda.get_device_capability(q.device) if cuda else None, dtype=q.dtype,
        head_dim=q.shape[-1], lo=lo, hi=hi, deterministic=torch.are_deterministic_algorithms_enabled(),
        env=os.environ.get("ATTNZOO_SPARSE_FA4"))
    if why is None and _interface() is None:
        why = _state["failed"]
    return why


def which_band_backward(q: torch.Tensor, pattern, key_padding_mask: torch.Tensor | None = None) -> str:
    """Which backward the ``triton`` sparse backend runs for ``pattern`` on inputs like ``q`` (``[B, H, N, D]``):
    ``"flash_attn.cute"``, or ``"attnzoo (<why not FlashAttention-4>)"``.

    >>> which_band_backward(q, SlidingWindow(window=256))  # on an H200 with flash-attn-4
    'flash_attn.cute'
    """
    band = pattern.band()
    if band is None:
        return "attnzoo (not a band pattern)"
    n_global = int(pattern.bind(q.shape[2], "cpu").global_rows.numel())
    why = fa4_backward_reason(q, band=True, n_global=n_global, lo=band[0], hi=band[1],
                              has_padding=key_padding_mask is not None)
    return "flash_attn.cute" if why is None else f"attnzoo ({why})"


def fa4_band_backward(q, k, v, o, do, lse, scale: float, lo: int, hi: int):
    """dQ, dK, dV of band attention (keys ``lo <= j - i <= hi``) through FlashAttention-4.

    q, o, do: ``[B, H, N, D]``; k, v: ``[B, Hkv, N, D]`` (H a multiple of Hkv); ``lse``: float32 ``[B, H, N]``,
    the forward's log-sum-exp of ``scale * q·k`` in natural log (attnzoo's forward writes it so when it knows this
    backward will run; its own kernels use base 2). Returns the three gradients as contiguous tensors in the shapes
    of q, k, v. Returns None, after one warning, when FlashAttention raises; the caller then runs its own kernels.
    """
    fa = _interface()
    if fa is None:
        return None
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - [B, H, N, D] <-> FlashAttention's [B, N, H, D], no copy
    # the gradients in attnzoo's layout (contiguous [B, H, N, D], as its own kernels return them), written by
    # FlashAttention through [B, N, H, D] views: no copies here, and none later where autograd reassembles them
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    try:
        fa._flash_attn_bwd(t(q), t(k), t(v), t(o), t(do), lse, softmax_scale=scale, causal=False,
                           window_size_left=-lo, window_size_right=hi, dq=t(dq), dk=t(dk), dv=t(dv))
        return dq, dk, dv
    except Exception as e:  # noqa: BLE001 - any failure: fall back to attnzoo's kernels for the rest of the process
        _state.pop("module", None)
        _state["failed"] = f"flash_attn.cute's backward failed once ({type(e).__name__}: {str(e)[:200]})"
        warnings.warn(f"attnzoo: {_state['failed']}; the band backward runs on attnzoo's own kernels from now on "
                      "(set ATTNZOO_SPARSE_FA4=0 to skip it from the start)", RuntimeWarning, stacklevel=3)
        return None
