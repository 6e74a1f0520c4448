"""Block-sparse attention through FlexAttention (the ``flex`` backend): the layout as a ``BlockMask``.

``BlockMask.from_kv_blocks`` takes the layout's four index tensors as they are (partial tiles evaluate the
pattern's ``mask_mod``, full tiles skip it), built once per layout; key padding is a ``score_mod``. Compiled on
CUDA (:func:`attnzoo.ops.flex.flex_function`), eager (forward only) elsewhere.
"""
from __future__ import annotations

import warnings

import torch

from ..flex import flex_function

__all__ = ["block_mask", "flex_sparse_attention"]

_NEG_INF = float("-inf")


def block_mask(layout):
    """The layout as a FlexAttention ``BlockMask`` (built once per layout, cached on it)."""
    bm = layout._cache.get("flex")
    if bm is None:
        from torch.nn.attention.flex_attention import BlockMask

        def rows(x):
            return x[None, None].contiguous()

        bm = BlockMask.from_kv_blocks(rows(layout.partial_count), rows(layout.partial_index),
                                      rows(layout.full_count), rows(layout.full_index), BLOCK_SIZE=layout.tile,
                                      mask_mod=layout.pattern.mask_mod(), seq_lengths=(layout.n, layout.n))
        layout._cache["flex"] = bm
    return bm


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, key_padding_mask=None,
                          scale: float | None = None, kernel_options: dict | None = None,
                          compile_mode: str | None = None) -> torch.Tensor:
    """``[B, Hq, n, D]`` attention over the layout's part of the pattern through FlexAttention (``kernel_options``:
    its tuning options; ``compile_mode``: ``torch.compile``'s mode on CUDA)."""
    bm = block_mask(layout)
    score_mod = None
    if key_padding_mask is not None:
        kpm = key_padding_mask

        def score_mod(score, b, h, q_idx, kv_idx):  # padding on every tile, full ones too
            return torch.where(kpm[b, kv_idx], score, _NEG_INF)
    fn = flex_function(q.device.type, compile_mode)
    kw = {"kernel_options": kernel_options} if kernel_options else {}
    with warnings.catch_warnings():  # off CUDA the unfused path is the point (tests), not a mistake
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  **kw)
