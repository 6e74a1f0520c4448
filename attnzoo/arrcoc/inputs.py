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


def rewrite_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
                   counts_in: list[int], tokens: list[torch.Tensor], embed: torch.nn.Module, pad_token_id: int, *,
                   position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   rows: list[list[int]] | None = None) -> Rewritten:
    """Replace image ``n``'s ``counts_in[n]`` image tokens by ``tokens[n]`` (``[k_n, D]``); see the module docstring.
    ``rows``: :func:`image_runs` when known.

    Vectorised over the batch: one host read (the rows' real-token counts and edge columns, which fix the output
    length and the padding side), one small index table copied to the device, then scatters (no per-row loop,
    no boolean indexing)."""
    if rows is None:
        rows = image_runs(input_ids, image_token_id, counts_in)
    b, t = input_ids.shape
    dev = input_ids.device
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    real = mask.bool()
    if attention_mask is None:
        per_row, first_all, last_all = [t] * b, True, True
    else:
        stats = torch.stack([real.sum(1), real[:, 0].long(), real[:, -1].long()]).tolist()  # the one host read
        per_row, first_all, last_all = stats[0], all(stats[1]), all(stats[2])
    side = "right" if first_all and not last_all and any(n < t for n in per_row) else "left"
    k = [int(x.shape[0]) for x in tokens]
    new_len = [per_row[r] + sum(k[n] - counts_in[n] for n in images) for r, images in enumerate(rows)]
    longest = max(new_len)
    spare = b * longest  # one spare slot past the rows takes every write that has no place (dropped at the end)
    # host-made table, one copy: per row its start column and length; per image its tokens and its first ordinal
    starts = [longest - n if side == "left" else 0 for n in new_len]
    n_img = sum(len(images) for images in rows)
    first_ordinal = [sum(counts_in[:n]) for n in range(n_img)]
    table = torch.tensor(starts + new_len + k[:n_img] + first_ordinal, dtype=torch.long).to(dev)
    start, length = table[:b], table[b:2 * b]
    img_k, img_first = table[2 * b:2 * b + n_img], table[2 * b + n_img:]

    is_img = (input_ids == image_token_id) & real
    is_text = real & ~is_img
    ordinal = is_img.flatten().cumsum(0).view(b, t) - 1  # the image tokens' place among all of the batch's
    if len(set(counts_in)) == 1:
        img_of = torch.div(ordinal.clamp_min(0), counts_in[0], rounding_mode="floor")
    else:
        img_of = torch.searchsorted(img_first, ordinal.clamp_min(0), right=True) - 1
    img_of = img_of.clamp(0, max(n_img - 1, 0))
    opens = is_img & (ordinal == img_first.take(img_of) if n_img else is_img)  # an image's first token
    step = is_text.long() + opens.long() * (img_k.take(img_of) if n_img else 0)  # output tokens each position opens
    col = step.cumsum(1) - step + start[:, None]  # where they go
    flat_col = col + torch.arange(0, spare, longest, device=dev)[:, None]
    text_dest = torch.where(is_text, flat_col, spare).flatten()

    text = embed(input_ids)
    d = text.shape[-1]
    pad_emb = embed(torch.full((1,), pad_token_id, dtype=input_ids.dtype, device=dev))[0]
    ids_out = input_ids.new_full((spare + 1,), pad_token_id).index_copy_(0, text_dest, input_ids.flatten())
    emb_out = pad_emb.to(text.dtype).expand(spare + 1, d).contiguous().index_copy_(0, text_dest, text.view(-1, d))
    lab_out = None
    if labels is not None:
        lab_out = labels.new_full((spare + 1,), -100).index_copy_(0, text_dest, labels.flatten())[:spare].view(b, -1)
    if n_img:
        # each visual token's flat destination: its image's first slot plus its index in the image
        img_slot = torch.full((n_img + 1,), spare, dtype=torch.long, device=dev).scatter_(
            0, torch.where(opens, img_of, n_img).flatten(), flat_col.flatten())[:n_img]
        which = torch.repeat_interleave(torch.arange(n_img, device=dev), img_k, output_size=sum(k))
        within = torch.arange(sum(k), device=dev) - (img_k.cumsum(0) - img_k).take(which)
        dest = img_slot.take(which) + within
        emb_out.index_copy_(0, dest, torch.cat([x.to(text.dtype) for x in tokens]))
        ids_out.index_fill_(0, dest, image_token_id)
    cols = torch.arange(longest, device=dev)
    mask_out = ((cols >= start[:, None]) & (cols < (start + length)[:, None])).to(mask.dtype)
    pos = None
    if position_ids is not None:
        pos = (mask_out.long().cumsum(-1) - 1).masked_fill(mask_out == 0, 1)
    return Rewritten(ids_out[:spare].view(b, longest), emb_out[:spare].view(b, longest, d), mask_out, pos, lab_out)
