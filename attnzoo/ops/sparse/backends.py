"""Sparse attention backends. Each says whether it can serve a :class:`SparseCall` and runs it.

* ``flex``: FlexAttention with a ``BlockMask`` built directly from the compiled layout (:mod:`.flex`),
  compiled on CUDA; off CUDA the eager (unfused) flex path, without autograd.
* ``triton``: attnzoo's own block-sparse FlashAttention kernels over the same layout
  (:mod:`.triton_kernel`), forward and backward.
* ``flash_attn_cute``: band patterns through FlashAttention-4's public ``flash_attn.cute.flash_attn_func``
  with ``window_size`` (:mod:`.flash_attn_cute`), where it is installed.
* ``gather``: pure PyTorch that visits the same layout (:mod:`.gather`): runs anywhere, with
  autograd and dropout, memory ``O(n x visited keys)``; the layout's executable specification.
* ``masked``: the pattern's dense keep mask (rows of the queries asked for) through the dense
  op :func:`attnzoo.ops.attention` (cuDNN/efficient/... on GPU): any call, including decoding
  (``q_len < k_len``); memory ``O(q_len x k_len)``.
* ``reference``: the dense keep mask through the dense reference (:mod:`.naive`); the
  oracle (float64 on CPU), any call.

The kernel backends (``flex``, ``triton``, ``gather``) compute the layout's part of the pattern; the
rows of global tokens are computed densely by :func:`fill_global_rows` (one dense row in a tile would
make that tile visit every KV tile), unless the backend says it computed them itself
(``computes_global_rows``: ``triton`` when they fill whole tiles of a tile-exact pattern).
"""
from __future__ import annotations

import functools

import torch

from ...errors import BackendUnavailableError
from ..dense import attention
from ..dispatch import Backend, short_error
from ..flex import flex_reason
from .call import SparseCall
from .flash_attn_cute import band_reason, flash_attn_cute_band
from .flex import flex_sparse_attention
from .gather import gather_attention
from .naive import sparse_attention_reference
from .options import sparse_kernel_options

__all__ = ["SparseBackend", "SPARSE_BACKENDS", "fill_global_rows"]


class SparseBackend(Backend):
    """A backend of the sparse op: the dense op's :class:`Backend` contract on a :class:`SparseCall`."""


def fill_global_rows(out: torch.Tensor, call: SparseCall) -> torch.Tensor:
    """Write the global tokens' rows (every key; causal: every earlier key) into a kernel's output."""
    rows = call.layout.global_rows
    if not call.global_rows or rows.numel() == 0:
        return out
    d = call.dense
    mask = None  # a global row keeps every key; causal: every earlier one (built once per layout, no host sync)
    if call.pattern.causal:
        mask = call.layout._cache.get("global_rows_mask")
        if mask is None:
            mask = call.layout._cache["global_rows_mask"] = call.keep_rows(rows)[None, None]
    o = attention(call.q.index_select(2, rows), call.k, call.v, mask=mask, key_padding_mask=d.key_padding_mask,
                  scale=d.scale, dropout_p=d.dropout_p)
    return out.index_copy(2, rows, o)


class _KernelBackend(SparseBackend):
    """A backend that runs the block layout (self-attention over one sequence)."""

    def check(self, call):
        if not call.self_attention:
            return (f"the block-sparse kernels take one sequence attending to itself (q_len == k_len), got "
                    f"q_len={call.dense.q_len}, k_len={call.dense.k_len} (decoding runs 'masked')")
        return None

    def run(self, call):
        out = self.kernel(call)
        return out if self.computes_global_rows(call) else fill_global_rows(out, call)

    def computes_global_rows(self, call: SparseCall) -> bool:
        """True when :meth:`kernel` already computed the global rows (default: no, they are filled densely)."""
        return False

    def kernel(self, call: SparseCall) -> torch.Tensor:
        raise NotImplementedError  # every concrete backend overrides this


# ---------------------------------------------------------------------------- gather (pure PyTorch)
class GatherBackend(_KernelBackend):
    name = "gather"
    description = "pure PyTorch over the block layout (gathered KV tiles); anywhere, autograd, dropout"

    def kernel(self, call):
        d = call.dense
        return gather_attention(call.q, call.k, call.v, call.layout, d.key_padding_mask, d.scale, d.dropout_p)


# ---------------------------------------------------------------------------- FlexAttention
class FlexBackend(_KernelBackend):
    name = "flex"
    description = "FlexAttention (compiled Triton on CUDA) with a BlockMask made from the layout"

    def check(self, call):
        why = super().check(call)
        if why:
            return why
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError as e:
            return f"torch.nn.attention.flex_attention is missing ({e})"
        if call.q.device.type == "cuda" and call.tile != 128:
            return (f"tile={call.tile}: on CUDA the flex backend serves 128-tiles only (compiled FlexAttention "
                    "needs sparse blocks divisible by its own 128-row kernel tiles: Inductor refused 64-tiles on an "
                    "H200); pass tile=128 to force it")
        if call.q.device.type == "cuda" and call.per_call:
            return ("a rule computed per call: its mask_mod is a new function at every call, so compiled "
                    "FlexAttention would recompile every time (use 'triton')")
        if call.q.device.type == "cuda" and call.dense.k_len < call.tile:
            return (f"sequence of {call.dense.k_len} tokens is shorter than one tile ({call.tile}): compiled "
                    "FlexAttention finds no kernel configuration for it (use 'triton' or a smaller tile)")
        return flex_reason(call.q, call.k, call.v, call.dense.dropout_p, call.dense.head_dim)

    def kernel(self, call):
        d = call.dense
        try:
            return flex_sparse_attention(call.q, call.k, call.v, call.layout, d.key_padding_mask, d.scale,
                                         call.kernel_options, sparse_kernel_options().flex_compile_mode)
        except Exception as e:  # compile / lowering failures: this backend cannot serve, say why
            raise BackendUnavailableError(f"FlexAttention failed on this call ({type(e).__name__}: "
                                          f"{short_error(str(e))})") from e


# ---------------------------------------------------------------------------- Triton
@functools.cache
def _triton_kernel():
    """:mod:`.triton_kernel`, imported on first use (it imports Triton)."""
    from . import triton_kernel

    return triton_kernel


class TritonBackend(_KernelBackend):
    name = "triton"
    description = "attnzoo's block-sparse FlashAttention kernel in Triton (bit-packed masks on partial tiles)"

    def check(self, call):
        why = super().check(call)
        if why:
            return why
        d = call.dense
        why = _triton_kernel().available(call.q.device.type)
        if why:
            return why
        if d.dropout_p > 0:
            return "the Triton kernel has no dropout"
        if call.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"takes float16/bfloat16/float32, inputs are {call.q.dtype}"
        hd = d.head_dim
        if d.v_dim != hd or hd < 16 or hd > 256 or hd & (hd - 1):
            return f"needs head_dim = v_dim, a power of two in [16, 256]; got {hd} and {d.v_dim}"
        if any(t.stride(-1) != 1 for t in (call.q, call.k, call.v)):
            return "needs q, k, v with a contiguous last dimension"
        pat = call.pattern
        if call.tile % 32 and pat.band() is None and not pat.tile_exact(call.tile):
            return (f"{pat.name} needs bit-packed masks on its partial tiles here: a tile that is a multiple of 32, "
                    f"got tile={call.tile}")
        return None

    def computes_global_rows(self, call):
        return call.global_rows and _triton_kernel().rows_in_kernel(call.layout)  # whole tiles, tile-exact

    def kernel(self, call):
        q, k, v = call.q, call.k, call.v
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # a remembered choice meets other strides
            raise BackendUnavailableError("needs q, k, v with a contiguous last dimension")
        d = call.dense
        return _triton_kernel().block_sparse_attention(q, k, v, call.layout, d.key_padding_mask, d.scale,
                                                       rows=call.global_rows)


# ---------------------------------------------------------------------------- FlashAttention-4 (public API)
class FlashAttnCuteBackend(_KernelBackend):
    name = "flash_attn_cute"
    description = "band patterns through flash_attn.cute.flash_attn_func(window_size=...), if installed"

    def check(self, call):
        return super().check(call) or band_reason(call)

    def kernel(self, call):
        if torch.are_deterministic_algorithms_enabled():  # a remembered choice meets deterministic mode
            raise BackendUnavailableError("torch.use_deterministic_algorithms is on (its backward adds dQ with "
                                          "float32 atomics)")
        lo, hi = call.pattern.band()
        try:
            return flash_attn_cute_band(call.q, call.k, call.v, lo, hi, call.dense.scale)
        except Exception as e:  # its own checks (shapes, architectures it has no kernel for): say why
            raise BackendUnavailableError(f"flash_attn.cute failed on this call ({type(e).__name__}: "
                                          f"{short_error(str(e))})") from e


# ---------------------------------------------------------------------------- dense masks
class MaskedBackend(SparseBackend):
    name = "masked"
    description = "the pattern's keep mask through the dense op attnzoo.ops.attention (any call, decoding too)"

    def run(self, call):
        d = call.dense
        keep = call.keep_rows(call.query_positions())
        return attention(call.q, call.k, call.v, mask=keep[None, None], key_padding_mask=d.key_padding_mask,
                         scale=d.scale, dropout_p=d.dropout_p)


class ReferenceBackend(SparseBackend):
    name = "reference"
    description = "the pattern's keep mask through the dense reference (the oracle; float64 on CPU)"

    def run(self, call):
        d = call.dense
        return sparse_attention_reference(call.q, call.k, call.v, call.bound, key_padding_mask=d.key_padding_mask,
                                          scale=d.scale, dropout_p=d.dropout_p, global_rows=call.global_rows)


SPARSE_BACKENDS: dict[str, SparseBackend] = {b.name: b for b in [
    FlexBackend(), TritonBackend(), FlashAttnCuteBackend(), GatherBackend(), MaskedBackend(), ReferenceBackend()]}
