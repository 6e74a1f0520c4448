"""One sparse pattern behind a Hugging Face attention call: the shared mechanism of the
``sliding_window``, ``longformer`` and ``bigbird`` patches.

Both ways a pattern reaches a Hugging Face model go through here:

* the ``"attnzoo"`` attention implementation (:mod:`.kernel`), for models that keep their own
  modules: the pattern comes from ``transformers`` (``sliding_window=S`` on mistral/qwen2/...)
  or from the module (``module.attnzoo_pattern``, set by the patch where ``transformers`` has no
  window);
* :class:`~attnzoo.patches.hf.wrapper.HFSparseAttention`, which replaces the modules of the
  other architectures.

Hugging Face hands the attention a mask it built: nothing, a 2-d padding mask, or a 4-d keep
(or additive) mask holding causality, padding and, for native windows, the window itself.
attnzoo's sparse op takes a pattern and a key-padding mask, so :func:`plan_pattern_call`
recovers the padding from the 4-d mask and **checks** that the mask is exactly "pattern AND
padding" (``O(q_len x k_len)`` elementwise work, the size of the mask Hugging Face already
built; "pattern" is causality alone where the window is attnzoo's). When it is, the call runs
on :func:`attnzoo.ops.sparse_attention` (block-sparse kernels); when it is not (packed
sequences, another window on top), the call runs on the dense op with the mask (Hugging
Face's own mask, AND the pattern unless the mask already holds it), which is exact in every
case. A pattern that keeps every key at the call's length (decoding within the window) runs
on the dense op too.

Queries are the *last* ``q_len`` positions of the ``k_len`` keys (attnzoo's convention). A
sliding window is translation-invariant, so this also holds for ``transformers``'
sliding-window cache, which keeps only the last ``S - 1`` keys.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ...ops import attention, sparse_attention
from ...ops.masks import causal_keep
from ...ops.sparse import BigBird, Dense, Longformer, Pattern, SlidingWindow
from .mask_memo import memoized

__all__ = ["fit_pattern", "pattern_rows", "padding_of", "covers", "PatternCall", "plan_pattern_call",
           "run_pattern_call"]


@functools.lru_cache(maxsize=256)
def fit_pattern(pattern: Pattern, n: int) -> Pattern:
    """``pattern`` as it applies to a bidirectional sequence of ``n`` tokens shorter than it was made for.

    * BigBird with ``n <= block_size``: the sequence is one block, which sees itself: every key
      (:class:`Dense`). With fewer blocks outside a query block's window than ``random_blocks``,
      each query block takes the blocks there are (the causal rule of the pattern; the draw is a
      prefix of the same seeded permutation, so the kept blocks are the ones a longer input draws first).
    * Longformer with ``global_tokens=g > n``: every token is global.

    Anything else is returned unchanged (and errors of the pattern itself still raise).
    """
    if pattern.causal:
        return pattern
    if isinstance(pattern, BigBird):
        if n <= pattern.block_size:
            return Dense(causal=False)
        r = pattern.random_blocks
        while r > 0:
            try:
                dataclasses.replace(pattern, random_blocks=r).check(n)
                break
            except ValueError:
                r -= 1
        return pattern if r == pattern.random_blocks else dataclasses.replace(pattern, random_blocks=r)
    if isinstance(pattern, Longformer) and isinstance(pattern.global_tokens, int) and pattern.global_tokens > n:
        return dataclasses.replace(pattern, global_tokens=n)
    return pattern


def pattern_rows(pattern: Pattern, q_len: int, k_len: int, device) -> torch.Tensor:
    """Bool ``[q_len, k_len]``: the pattern's keep mask for the last ``q_len`` of ``k_len`` positions."""
    rows = torch.arange(k_len - q_len, k_len, device=device)
    return pattern.bind(k_len, device).keep_mask(rows)


def padding_of(keep: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """The key-padding mask ``[batch, k_len]`` when ``keep`` (``[batch, heads|1, q, k]``) is exactly
    ``base AND padding`` (``base``: ``[q, k]``); else None. Keys no query of ``base`` attends to count
    as padding (they are never read)."""
    kpm = (keep & base).any(dim=-2)[:, 0]  # [batch, k]
    if not bool((keep == (base & kpm[:, None, None, :])).all()):
        return None
    return kpm


def covers(pattern: Pattern, k_len: int) -> bool:
    """The pattern keeps every key (causal: every earlier key) at this length: plain dense attention."""
    if isinstance(pattern, Dense):
        return True
    return isinstance(pattern, SlidingWindow) and pattern.window >= k_len - 1


@dataclass
class PatternCall:
    """How to run one call: the pattern (fitted to the length) with a key-padding mask on the sparse op,
    or (``dense``) the dense op with ``causal``, a keep ``mask`` and the key-padding mask. With
    ``global_rows=False`` the caller overwrites the global rows (Longformer's global projections)."""

    pattern: Pattern
    key_padding_mask: torch.Tensor | None = None
    dense: bool = False
    mask: torch.Tensor | None = None
    fallback: bool = False  # HF's mask was more than the pattern and padding

    @property
    def sparse(self) -> bool:
        return not self.dense


def plan_pattern_call(pattern: Pattern, keep: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                      q_len: int, k_len: int, device, *, mask_has_pattern: bool = False) -> PatternCall:
    """Decide how to run ``pattern`` under Hugging Face's masks.

    Args:
        pattern: the attention pattern (its ``causal`` flag included).
        keep: HF's 4-d mask as a bool keep mask (``[batch, heads|1, q_len, k_len]``) or None.
        key_padding_mask: HF's 2-d padding mask as bool ``[batch, >= k_len]`` (its last ``k_len``
            columns are the keys) or None.
        mask_has_pattern: ``keep`` already holds the pattern (a window ``transformers`` built itself);
            the dense fallback then uses ``keep`` alone.

    A pattern that keeps everything at this length (a window of at least ``k_len - 1``) runs on
    the dense op, whose fused kernels are the fastest there.

    The plan is memoized per mask tensors (:mod:`.mask_memo`): the layers of one forward share it,
    so the checks that read the masks on the host run once, not once per layer.
    """
    key = ("plan_pattern_call", pattern, q_len, k_len, str(device), mask_has_pattern)
    return memoized((keep, key_padding_mask), key,
                    lambda: _plan(pattern, keep, key_padding_mask, q_len, k_len, device, mask_has_pattern))


def _plan(pattern: Pattern, keep: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q_len: int,
          k_len: int, device, mask_has_pattern: bool) -> PatternCall:
    pattern = fit_pattern(pattern, k_len)
    if key_padding_mask is not None and key_padding_mask.shape[-1] != k_len:
        key_padding_mask = key_padding_mask[:, -k_len:]
    if keep is not None and (keep.shape[-1] != k_len or keep.shape[-2] != q_len):
        raise ValueError(f"attention_mask covers {keep.shape[-2]} queries x {keep.shape[-1]} keys, but the "
                         f"attention has {q_len} x {k_len}")
    if keep is not None and q_len < k_len and not mask_has_pattern and not bool(keep[..., -1, -1].all()):
        raise ValueError(f"{pattern.describe()}: the last query does not attend to the last key, so the queries are "
                         "not the last positions of the keys (a static cache?); attnzoo's sparse patterns decode with "
                         "transformers' dynamic caches (generate()'s default)")
    dense = covers(pattern, k_len)
    if keep is not None:
        rows = pattern_rows(pattern, q_len, k_len, device) if mask_has_pattern or not dense else None
        if mask_has_pattern:
            base = rows
        elif pattern.causal:
            base = causal_keep(q_len, k_len, device=device)
        else:
            base = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        kpm = padding_of(keep, base)  # HF's mask = what it holds of the pattern AND padding?
        if kpm is None:  # more than that: the dense op with HF's mask AND the pattern
            mask = keep if mask_has_pattern else keep & (base if dense else rows)
            return PatternCall(pattern, key_padding_mask, dense=True, mask=mask, fallback=True)
        key_padding_mask = kpm if key_padding_mask is None else kpm & key_padding_mask
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    return PatternCall(pattern, key_padding_mask=key_padding_mask, dense=dense)


def run_pattern_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: PatternCall, *,
                     scale: float | None = None, dropout: float = 0.0, global_rows: bool = True) -> torch.Tensor:
    """``[batch, q_heads, q_len, head_dim]`` for q/k/v in attnzoo's layout (grouped KV heads read in place)."""
    if call.sparse:
        return sparse_attention(q, k, v, call.pattern, key_padding_mask=call.key_padding_mask, scale=scale,
                                dropout_p=dropout, global_rows=global_rows)
    if not global_rows and call.fallback:
        raise ValueError(f"{call.pattern.describe()}: this attention mask is more than the pattern and padding "
                         "(packed sequences?), which longformer with global_projections=True does not take; "
                         "pass a 2-d padding mask")
    causal = call.pattern.causal and call.mask is None and q.shape[2] > 1
    return attention(q, k, v, causal=causal, mask=call.mask, key_padding_mask=call.key_padding_mask, scale=scale,
                     dropout_p=dropout)
