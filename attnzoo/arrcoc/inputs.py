"""Rewriting a VLM's inputs for a new number of visual tokens per image, consistently: ``input_ids``,
``inputs_embeds``, ``attention_mask``, ``position_ids`` and ``labels``.

The processor of a LLaVA-style model expands each image into ``full`` copies of the image token (576 for
LLaVA-1.5). :func:`rewrite_inputs` replaces the run of image tokens of image ``n`` by ``len(tokens[n])`` image
tokens whose embeddings are ``tokens[n]``, keeps every text token, and re-pads the rows on the side the input
was padded (left when nothing was padded: the side ``generate()`` needs). Positions, when the caller passed
them, are recomputed from the new mask as ``generate()`` does (``cumsum(mask) - 1``, 1 where padded); labels get
``-100`` on the image tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Rewritten", "image_runs", "rewrite_inputs", "text_query"]


@dataclass
class Rewritten:
    """The rewritten inputs (``position_ids``/``labels`` None when not given)."""

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None


def image_runs(input_ids: torch.Tensor, image_token_id: int, counts: list[int], *,
               per_row: list[int] | None = None) -> list[list[int]]:
    """The images of each row: ``[[image index, ...] per row]``, checking that the rows hold ``counts[n]``
    image tokens for image ``n``, images in order (a ``ValueError`` names the mismatch). ``per_row``: the image
    tokens of each row when already read (else one host read)."""
    if per_row is None:
        per_row = (input_ids == image_token_id).sum(1).tolist()
    out, n = [], 0
    for row, have in enumerate(per_row):
        mine = []
        while have > 0 and n < len(counts):
            have -= counts[n]
            mine.append(n)
            n += 1
        if have != 0:
            break
        out.append(mine)
    if len(out) != len(per_row) or n != len(counts):
        raise ValueError(f"the input_ids hold {per_row} image tokens (id {image_token_id}) per row, which does not "
                         f"match {len(counts)} image(s) of {counts} tokens each, in order")
    return out


def text_query(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
               embed: torch.nn.Module) -> torch.Tensor:
    """The query of each row for the coupling scorer: the mean input embedding of its text tokens (not image
    tokens, not padding), ``[rows, D]``."""
    keep = input_ids != image_token_id
    if attention_mask is not None:
        keep &= attention_mask.bool()
    e = embed(input_ids)
    w = keep.unsqueeze(-1).to(e.dtype)
    return (e * w).sum(1) / w.sum(1).clamp_min(1)


def _padding_side(mask: torch.Tensor | None) -> str:
    if mask is None or bool(mask.all()):
        return "left"
    return "right" if bool(mask[:, 0].all()) and not bool(mask[:, -1].all()) else "left"


def rewrite_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
                   counts_in: list[int], tokens: list[torch.Tensor], embed: torch.nn.Module, pad_token_id: int, *,
                   position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   rows: list[list[int]] | None = None) -> Rewritten:
    """Replace image ``n``'s ``counts_in[n]`` image tokens by ``tokens[n]`` (``[k_n, D]``); see the module docstring.
    ``rows``: :func:`image_runs` when known."""
    if rows is None:
        rows = image_runs(input_ids, image_token_id, counts_in)
    side = _padding_side(attention_mask)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    text = embed(input_ids)
    new_ids, new_emb, new_lab = [], [], []
    for r, images in enumerate(rows):
        real = mask[r].bool()
        ids, emb = input_ids[r][real], text[r][real]
        lab = labels[r][real] if labels is not None else None
        flags = (ids == image_token_id).tolist()  # one host read per row; the walk below is plain Python
        out_ids, out_emb, out_lab, i, k = [], [], [], 0, 0
        while i < len(flags):
            if flags[i]:
                n = images[k]
                t = tokens[n].to(emb.dtype)
                out_ids.append(torch.full((t.shape[0],), image_token_id, dtype=ids.dtype, device=ids.device))
                out_emb.append(t)
                if lab is not None:
                    out_lab.append(torch.full((t.shape[0],), -100, dtype=lab.dtype, device=lab.device))
                i += counts_in[n]
                k += 1
            else:
                j = i
                while j < len(flags) and not flags[j]:
                    j += 1
                out_ids.append(ids[i:j])
                out_emb.append(emb[i:j])
                if lab is not None:
                    out_lab.append(lab[i:j])
                i = j
        new_ids.append(torch.cat(out_ids))
        new_emb.append(torch.cat(out_emb))
        if lab is not None:
            new_lab.append(torch.cat(out_lab))
    longest = max(len(x) for x in new_ids)
    b = len(new_ids)
    ids_out = input_ids.new_full((b, longest), pad_token_id)
    emb_out = text.new_zeros(b, longest, text.shape[-1])
    mask_out = mask.new_zeros(b, longest)
    lab_out = labels.new_full((b, longest), -100) if labels is not None else None
    for r in range(b):
        n = len(new_ids[r])
        sl = slice(longest - n, longest) if side == "left" else slice(0, n)
        ids_out[r, sl] = new_ids[r]
        emb_out[r, sl] = new_emb[r]
        mask_out[r, sl] = 1
        if lab_out is not None:
            lab_out[r, sl] = new_lab[r]
    pad_emb = embed(torch.full((1,), pad_token_id, dtype=input_ids.dtype, device=input_ids.device))[0]
    emb_out[~mask_out.bool()] = pad_emb.to(emb_out.dtype)
    pos = None
    if position_ids is not None:
        pos = (mask_out.long().cumsum(-1) - 1).masked_fill(mask_out == 0, 1)
    return Rewritten(ids_out, emb_out, mask_out, pos, lab_out)
