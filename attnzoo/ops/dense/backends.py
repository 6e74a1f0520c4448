"""Dense attention backends. Each says whether it can serve a call and runs it.

A backend's :meth:`Backend.check` answers from the call's facts alone (device,
dtype, masks, ...); :meth:`Backend.run` may still raise
:class:`~attnzoo.errors.BackendUnavailableError` when the library underneath
turns the call down at run time (PyTorch's SDPA decides per call). Both paths
give a reason that :func:`attnzoo.ops.explain` reports.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import warnings

import torch
import torch.nn.functional as F

from ...errors import BackendUnavailableError
from ..dispatch import Backend, short_error
from ..flex import flex_function, flex_reason
from .naive import attention_reference

__all__ = ["Backend", "BACKENDS"]

_HALF = (torch.float16, torch.bfloat16)


def _empty_rows(keep: torch.Tensor | None) -> torch.Tensor | None:
    """Bool ``[.., Nq, 1]`` marking query rows that may attend to nothing, or None if there are none."""
    if keep is None:
        return None
    empty = ~keep.any(-1, keepdim=True)
    return empty if bool(empty.any()) else None


def _zero_empty_rows(out: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
    return out if empty is None else out.masked_fill(empty, 0.0)


# ---------------------------------------------------------------------------- eager
class EagerBackend(Backend):
    name = "eager"
    description = "plain PyTorch matmul + softmax (float32 math for half inputs); the reference, runs anywhere"

    def run(self, call):
        return attention_reference(call.q, call.k, call.v, causal=call.causal, mask=call.mask,
                                   key_padding_mask=call.key_padding_mask, scale=call.scale, dropout_p=call.dropout_p)


# ---------------------------------------------------------------------------- SDPA
class SDPABackend(Backend):
    """``F.scaled_dot_product_attention`` restricted to one of PyTorch's kernels."""

    def __init__(self, name, kernel: str, description, devices=("cuda",), dtypes=None, masks=True,
                 pad_head_dims=False):
        self.name, self.kernel, self.description = name, kernel, description
        self.devices, self.dtypes, self.masks = devices, dtypes, masks
        # the kernel needs one head_dim for q, k and v: a value head_dim unlike the query's (MLA's prefill: 192 /
        # 128) runs zero-padded to the larger one (exact: zero dims add nothing to q.k, zero value columns are
        # sliced off), at the FLOPs of the padded width
        self.pad_head_dims = pad_head_dims

    def _sdp_backend(self):
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, self.kernel)

    def check(self, call):
        dev = call.q.device.type
        if dev not in self.devices:
            return f"needs a {' or '.join(self.devices)} device, inputs are on {dev}"
        if self.dtypes is not None and dev == "cuda" and call.q.dtype not in self.dtypes:
            return f"takes {', '.join(str(d) for d in self.dtypes)} on CUDA, inputs are {call.q.dtype}"
        if not self.masks and call.has_masks:
            return "takes no key-padding or boolean masks (only causal)"
        return None

    def run(self, call):
        q, k, v = call.q, call.k, call.v
        empty = None
        attn_mask, is_causal = None, False
        if call.has_masks:
            keep = call.keep
            empty = _empty_rows(keep)
            attn_mask = keep if empty is None else keep | empty
        elif call.causal and call.q_len == call.k_len:
            is_causal = True
        elif call.causal and call.q_len > 1:  # bottom-right causal with a cache
            from torch.nn.attention.bias import causal_lower_right

            attn_mask = causal_lower_right(call.q_len, call.k_len)
        v_dim = call.v_dim
        if self.pad_head_dims and v_dim != call.head_dim:
            d = max(v_dim, call.head_dim)
            scale = call.scale if call.scale is not None else call.head_dim ** -0.5
            q, k, v = (F.pad(t, (0, d - t.shape[-1])) for t in (q, k, v))
            call = dataclasses.replace(call, q=q, k=k, v=v, scale=scale)
        fold = False
        if call.groups > 1 and not self._gqa_ok(call) and attn_mask is None and not is_causal:
            fold = True  # grouped heads folded into the query length: K/V are read as they are
        out = self._call(q, k, v, attn_mask, is_causal, call, fold)
        if out.shape[-1] != v_dim:
            out = out[..., :v_dim]
        return _zero_empty_rows(out, empty)

    _gqa_cache: dict = {}

    def _gqa_ok(self, call):
        return self._gqa_cache.get((self.name, call.q.device.type), True)

    def _call(self, q, k, v, attn_mask, is_causal, call, fold):
        from torch.nn.attention import sdpa_kernel

        dp = call.dropout_p
        b, hq, nq, d = q.shape
        if fold:
            q = q.reshape(b, call.kv_heads, call.groups * nq, d)
        gqa = call.groups > 1 and not fold
        backend = self._sdp_backend()
        if (attn_mask is None or isinstance(attn_mask, torch.Tensor)) and _sdp_choice(
                q, k, v, attn_mask, dp, is_causal, call.scale, gqa) == backend.value:
            # PyTorch would pick this very kernel by itself: skip the context managers (~20 µs of host
            # time a call, which shows at short sequence lengths)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dp, is_causal=is_causal,
                                                 scale=call.scale, enable_gqa=gqa)
            return out.reshape(b, hq, nq, out.shape[-1]) if fold else out
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dp,
                                                         is_causal=is_causal, scale=call.scale, enable_gqa=gqa)
        except RuntimeError as e:
            msg = str(e)
            if "No available kernel" not in msg and "not supported" not in msg.lower():
                raise
            key = (self.name, call.q.device.type)
            # a kernel turning down a value head_dim unlike the query's says nothing about grouped heads
            if call.groups > 1 and not fold and call.v_dim == call.head_dim and self._gqa_cache.get(key, True):
                # retry without enable_gqa: fold the groups when that is exact, else give up
                self._gqa_cache[key] = False
                if attn_mask is None and not is_causal:
                    return self._call(call.q, k, v, attn_mask, is_causal, call, True)
                raise BackendUnavailableError(
                    f"PyTorch's {self.kernel} kernel does not take grouped KV heads "
                    f"(enable_gqa) for this call, and folding the groups is only exact without causal or "
                    f"boolean masks") from None
            raise BackendUnavailableError(f"PyTorch's {self.kernel} kernel turned this call down "
                                          f"({short_error(msg)})") from None
        if fold:
            out = out.reshape(b, hq, nq, out.shape[-1])
        return out


def _sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> int:
    """The kernel PyTorch's SDPA would choose by itself (an ``SDPBackend`` value), or -1 if unknown."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return -1
    try:
        return int(choose(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa))
    except (RuntimeError, TypeError):
        return -1


# ---------------------------------------------------------------------------- flash_attn package
class FlashAttnBackend(Backend):
    """The ``flash_attn`` package: FA2's ``flash_attn_func`` / ``flash_attn_varlen_func``,
    or, when ``cute=True``, ``flash_attn.cute.flash_attn_func`` (FA3/FA4 CuTe kernels)."""

    def __init__(self, cute: bool):
        self.cute = cute
        self.name = "flash_attn_cute" if cute else "flash_attn"
        self.description = ("flash_attn.cute (FlashAttention CuTe kernels for Hopper/Blackwell)" if cute
                            else "flash_attn package, FlashAttention-2 (key padding through varlen unpadding)")

    def available(self):
        mod = "flash_attn.cute" if self.cute else "flash_attn"
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            extra = "fa4" if self.cute else "flash"  # flash_attn.cute ships as flash-attn-4
            return f"package {mod!r} is not installed (pip install 'attnzoo[{extra}]')"
        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
        return None

    def check(self, call):
        why = self.available()
        if why:
            return why
        if call.q.device.type != "cuda":
            return "needs CUDA inputs"
        if call.q.dtype not in _HALF:
            return f"takes float16/bfloat16, inputs are {call.q.dtype}"
        if call.head_dim > 256 or call.head_dim % 8:
            return f"takes head_dim a multiple of 8 up to 256, got {call.head_dim}"
        if call.mask is not None:
            return "takes no boolean mask (only causal and key padding)"
        if self.cute and (call.key_padding_mask is not None or call.dropout_p > 0):
            return "this attnzoo path passes neither key padding nor dropout to flash_attn.cute"
        if call.key_padding_mask is not None and call.causal:
            return "key padding with causal is not unpadded exactly (bottom-right alignment per sequence)"
        if call.v_dim != call.head_dim and not self.cute:
            return "FA2 needs the value head_dim equal to the query head_dim"
        return None

    def run(self, call):
        q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))  # [B, N, H, D]
        if self.cute:
            from flash_attn.cute import flash_attn_func

            out = flash_attn_func(q, k, v, softmax_scale=call.scale, causal=call.causal)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if call.key_padding_mask is None:
            out = flash_attn_func(q, k, v, dropout_p=call.dropout_p, softmax_scale=call.scale, causal=call.causal)
            return out.transpose(1, 2)
        # non-causal key padding: drop the padded keys, keep every query
        kpm = call.key_padding_mask
        b, nq, nk = call.batch, call.q_len, call.k_len
        lens_k = kpm.sum(1, dtype=torch.int32)
        idx = kpm.reshape(-1).nonzero(as_tuple=True)[0]
        k_un = k.reshape(b * nk, *k.shape[2:]).index_select(0, idx)
        v_un = v.reshape(b * nk, *v.shape[2:]).index_select(0, idx)
        cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * nq, nq, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(q.reshape(b * nq, *q.shape[2:]), k_un, v_un, cu_q, cu_k, nq,
                                     int(lens_k.max()), dropout_p=call.dropout_p, softmax_scale=call.scale)
        out = out.reshape(b, nq, *out.shape[1:]).transpose(1, 2)
        return _zero_empty_rows(out, (lens_k == 0).view(b, 1, 1, 1) if bool((lens_k == 0).any()) else None)


# ---------------------------------------------------------------------------- FlexAttention
_causal_block_masks: dict = {}


class FlexBackend(Backend):
    name = "flex"
    description = "torch FlexAttention (compiled Triton on CUDA) with a BlockMask built from the masks"

    def available(self):
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as e:
            return f"torch.nn.attention.flex_attention is missing ({e})"
        return None

    def check(self, call):
        return self.available() or flex_reason(call.q, call.k, call.v, call.dropout_p, call.head_dim)

    def block_mask(self, call):
        from torch.nn.attention.flex_attention import create_block_mask

        nq, nk, dev = call.q_len, call.k_len, call.q.device
        off = nk - nq
        if not call.has_masks:
            if not call.causal:
                return None
            key = (nq, nk, str(dev))
            if key not in _causal_block_masks:
                _causal_block_masks[key] = create_block_mask(lambda b, h, i, j: j <= i + off, None, None, nq, nk,
                                                             device=dev)
            return _causal_block_masks[key]
        mask, kpm, causal = call.mask, call.key_padding_mask, call.causal

        def mask_mod(b, h, i, j):
            keep = (j <= i + off) if causal else (j >= 0)
            if kpm is not None:
                keep = keep & kpm[b, j]
            if mask is not None:
                keep = keep & mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0,
                                   i if mask.shape[2] > 1 else 0, j if mask.shape[3] > 1 else 0]
            return keep

        bsz = call.batch if (kpm is not None or (mask is not None and mask.shape[0] > 1)) else None
        hs = call.q_heads if (mask is not None and mask.shape[1] > 1) else None
        return create_block_mask(mask_mod, bsz, hs, nq, nk, device=dev)

    def run(self, call):
        bm = self.block_mask(call)
        fn = flex_function(call.q.device.type)
        try:
            with warnings.catch_warnings():  # off CUDA the unfused path is the point (tests), not a mistake
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = fn(call.q, call.k, call.v, block_mask=bm, scale=call.scale, enable_gqa=call.groups > 1)
        except Exception as e:  # compile / lowering failures: this backend cannot serve, say why
            raise BackendUnavailableError(f"FlexAttention failed on this call ({type(e).__name__}: "
                                          f"{short_error(str(e))})") from e
        if call.has_masks:  # flex already returns 0 for fully masked rows; keep grads clean too
            out = _zero_empty_rows(out, _empty_rows(call.keep))
        return out


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    SDPABackend("sdpa_cudnn", "CUDNN_ATTENTION", "SDPA, cuDNN fused attention (fastest on Hopper)",
                dtypes=_HALF),
    FlashAttnBackend(cute=True),
    SDPABackend("sdpa_flash", "FLASH_ATTENTION", "SDPA, FlashAttention-2 kernel (CUDA; also PyTorch's CPU flash)",
                devices=("cuda", "cpu"), dtypes=_HALF, masks=False, pad_head_dims=True),
    FlashAttnBackend(cute=False),
    SDPABackend("sdpa_efficient", "EFFICIENT_ATTENTION", "SDPA, memory-efficient (xFormers) kernel, takes masks",
                dtypes=_HALF + (torch.float32,)),
    FlexBackend(),
    SDPABackend("sdpa_math", "MATH", "SDPA, PyTorch's unfused math path", devices=("cuda", "cpu")),
    EagerBackend(),
]}
