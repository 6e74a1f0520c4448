"""The run-time plug-ins on a LLaVA-style model: :class:`ArrcocPlugin` (``patch(vlm, "arrcoc", ...)``) and its
FastV-style baseline :class:`VisualTopKPlugin` (``patch(vlm, "visual_topk", ...)``).

Both decide, per image, which visual tokens the language model sees, and rewrite the inputs accordingly
(:func:`attnzoo.arrcoc.inputs.rewrite_inputs`). They hook the model through public APIs only:

* a forward pre-hook (``register_forward_pre_hook(with_kwargs=True)``): a call with ``pixel_values`` and
  ``input_ids`` holding the processor's ``full`` image tokens per image is turned into a call with
  ``inputs_embeds`` holding the chosen visual tokens, the matching ``attention_mask`` (and ``position_ids``,
  ``labels`` when given); the logits then follow the rewritten sequence;
* ``generate`` on the instance: the rewrite happens before ``transformers``' ``generate`` sees the prompt, so
  its lengths, cache positions and masks all follow the rewritten sequence (``generate(**processor_outputs)``
  works unchanged; the returned sequences hold the rewritten prompt).

:meth:`TokenPlugin.remove` undoes both (the benchmark measures one model with and without). The plug-in's own
parameters (the tension balancer's weights) are kept out of the model's ``state_dict``: ``save_pretrained``
writes the plain checkpoint.
"""
from __future__ import annotations

import functools
import sys
from abc import ABC, abstractmethod

import torch

from ..errors import UnsupportedArchitectureError
from .allocator import TokenBudgetAllocator
from .inputs import Rewritten, image_runs, rewrite_inputs, text_query
from .lod import VisionTower, encode_regions, use_region_kernel
from .scorers import RelevanceScorer
from .texture import texture_array

__all__ = ["TokenPlugin", "ArrcocPlugin", "VisualTopKPlugin", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PLUGIN_ATTR"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PLUGIN_ATTR = "attnzoo_visual_tokens"  # the installed plug-in, on the model


def _image_token_id(config) -> int:
    for name in ("image_token_id", "image_token_index"):
        v = getattr(config, name, None)
        if v is not None:
            return int(v)
    raise UnsupportedArchitectureError(f"{type(config).__name__} has no image_token_id: not a LLaVA-style config")


def _pad_token_id(config) -> int:
    for c in (config, getattr(config, "text_config", None)):
        v = getattr(c, "pad_token_id", None)
        if v is not None:
            return int(v)
    return 0


class TokenPlugin(ABC):
    """Base of the two plug-ins: finding the images' tokens, the rewrite, the hooks. Subclasses implement
    :meth:`visual_tokens`."""

    name = ""

    def __init__(self, vlm):
        self.vlm = vlm
        self.tower = VisionTower(vlm)
        self.image_token_id = _image_token_id(vlm.config)
        self.pad_token_id = _pad_token_id(vlm.config)
        self.embed = vlm.get_input_embeddings()
        self._handle = None
        self.last: dict = {}  # what the last prepared call decided (levels, scores, kept indices)

    # ------------------------------------------------------------------ what subclasses decide
    @abstractmethod
    def visual_tokens(self, input_ids, pixel_values, attention_mask, counts_in, rows=None) -> list[torch.Tensor]:
        """The visual tokens ``[k_n, D]`` of each image (``rows``: :func:`image_runs` when known)."""

    # ------------------------------------------------------------------ the rewrite
    def counts_in(self, input_ids: torch.Tensor, n_images: int, per_row: list[int] | None = None) -> list[int]:
        """``[full] * n_images``, after checking the ids hold that many image tokens (``per_row``: the image
        tokens of each row when already read)."""
        full = self.tower.full_tokens
        have = sum(per_row) if per_row is not None else int((input_ids == self.image_token_id).sum())
        if have != n_images * full:
            raise ValueError(f"{self.name}: input_ids hold {have} image tokens (id {self.image_token_id}) for "
                             f"{n_images} image(s); expected {full} per image, as the model's processor writes them")
        return [full] * n_images

    def prepare(self, input_ids, pixel_values, attention_mask=None, position_ids=None, labels=None) -> Rewritten:
        """The rewritten inputs for a call with ``pixel_values`` (see the module docstring)."""
        per_row = (input_ids == self.image_token_id).sum(1).tolist()  # the one host read of the ids
        counts = self.counts_in(input_ids, pixel_values.shape[0], per_row)
        rows = image_runs(input_ids, self.image_token_id, counts, per_row=per_row)
        tokens = self.visual_tokens(input_ids, pixel_values, attention_mask, counts, rows=rows)
        return rewrite_inputs(input_ids, attention_mask, self.image_token_id, counts, tokens, self.embed,
                              self.pad_token_id, position_ids=position_ids, labels=labels, rows=rows)

    # ------------------------------------------------------------------ the hooks
    def _pre_hook(self, module, args, kwargs):
        if args:
            names = ("input_ids", "pixel_values", "attention_mask", "position_ids")
            kwargs = {**dict(zip(names, args)), **kwargs}
        if kwargs.get("pixel_values") is None:
            return ((), kwargs) if args else None
        if kwargs.get("input_ids") is None:
            raise ValueError(f"{self.name}: a call with pixel_values needs input_ids (the image tokens say where the "
                             "visual tokens go; the text tokens are the query)")
        r = self.prepare(kwargs["input_ids"], kwargs["pixel_values"], kwargs.get("attention_mask"),
                         kwargs.get("position_ids"), kwargs.get("labels"))
        kwargs.update(input_ids=None, pixel_values=None, inputs_embeds=r.inputs_embeds, attention_mask=r.attention_mask)
        if r.position_ids is not None:
            kwargs["position_ids"] = r.position_ids
        if r.labels is not None:
            kwargs["labels"] = r.labels
        kwargs.pop("cache_position", None)  # the lengths changed; the model derives it again
        return (), kwargs

    def _generate(self, original, *args, **kwargs):
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or ids is None:
            return original(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("inputs", "input_ids", "pixel_values")}
        r = self.prepare(ids, pixel_values, kwargs.get("attention_mask"))
        kwargs.update(input_ids=r.input_ids, attention_mask=r.attention_mask, inputs_embeds=r.inputs_embeds)
        return original(**kwargs)

    def install(self) -> "TokenPlugin":
        vlm = self.vlm
        if getattr(vlm, PLUGIN_ATTR, None) is not None:
            raise ValueError(f"{type(vlm).__name__} already has the {getattr(vlm, PLUGIN_ATTR).name!r} plug-in")
        self._handle = vlm.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        original = type(vlm).generate.__get__(vlm)
        vlm.generate = functools.wraps(original)(functools.partial(self._generate, original))
        setattr(vlm, PLUGIN_ATTR, self)
        return self

    def remove(self) -> None:
        """Undo :meth:`install` (the model computes as before)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.vlm.__dict__.pop("generate", None)
        if getattr(self.vlm, PLUGIN_ATTR, None) is self:
            delattr(self.vlm, PLUGIN_ATTR)


class ArrcocPlugin(TokenPlugin):
    """ARR-COC on a LLaVA-style model: relevance per region (texture scorers + coupling of the tower's glimpse
    with the prompt), tokens per region (the allocator), each region encoded at its level
    (:func:`attnzoo.arrcoc.encode_regions`).

    The coupling's region features come from a *glimpse*: the whole image encoded once at
    ``grid * isqrt(min(levels))`` patches per side (16 x 16 for the default levels at grid 2), projected into
    the language model's embedding space and averaged per region; the query is the mean embedding of the prompt's
    text tokens. ``image_mean``/``image_std`` undo the processor's normalisation for the texture array."""

    name = "arrcoc"

    def __init__(self, vlm, *, budget: int, levels=None, grid: int = 2, temperature: float = 0.1,
                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, scorer: RelevanceScorer | None = None):
        super().__init__(vlm)
        self.allocator = TokenBudgetAllocator(budget, levels, temperature)
        self.allocator.best_total(grid * grid)  # infeasible budgets fail now, not at the first image
        self.grid = grid
        side = self.tower.side
        if side < grid:
            raise ValueError(f"grid={grid}: the tower's image has only {side} patches per side")
        self.glimpse_side = grid * max(1, int(self.allocator.levels[0] ** 0.5))
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._norm: dict = {}  # (mean, std) per device, moved once
        self.scorer = scorer if scorer is not None else RelevanceScorer()
        use_region_kernel(self.tower.tower)

    def unit_rgb(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dev = pixel_values.device
        if dev not in self._norm:
            self._norm[dev] = (self.image_mean.to(dev), self.image_std.to(dev))
        mean, std = self._norm[dev]
        return torch.addcmul(mean, pixel_values.float(), std).clamp_(0, 1)

    def glimpse(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Region features ``[N, R, D_lm]`` from one coarse pass of the tower over each whole image (the images
        as a batch: equal lengths, the tower's own attention)."""
        g, s = self.glimpse_side, self.glimpse_side // self.grid
        x = self.tower.embed(pixel_values, g, g)
        length = x.shape[1]
        feats = self.tower.projector(self.tower.run_layers(x)[:, length - g * g:])
        n = feats.shape[0]
        d = feats.shape[-1]
        return feats.view(n, self.grid, s, self.grid, s, d).mean((2, 4)).reshape(n, self.grid * self.grid, d)

    @torch.no_grad()
    def allocate(self, input_ids, pixel_values, attention_mask=None, counts_in=None, rows=None
                 ) -> dict[str, torch.Tensor]:
        """Scores (``information``, ``salience``, ``coupling``, ``relevance``, each ``[N, R]``) and ``levels``
        (tokens per region, ``[N, R]``) for these images and prompts. Reads nothing on the host once ``rows``
        (:func:`image_runs`) is given."""
        counts_in = counts_in or self.counts_in(input_ids, pixel_values.shape[0])
        if rows is None:
            rows = image_runs(input_ids, self.image_token_id, counts_in)
        first = next(self.scorer.parameters(), None)
        if first is not None and first.device != pixel_values.device:
            self.scorer.to(pixel_values.device)
        texture = texture_array(self.unit_rgb(pixel_values), check=False)  # clamped to [0, 1] already
        query_rows = text_query(input_ids, attention_mask, self.image_token_id, self.embed)
        row_of = [r for r, images in enumerate(rows) for _ in images]
        if row_of != list(range(len(rows))):  # not one image per row: pick each image's row
            query_rows = query_rows[torch.tensor(row_of, device=query_rows.device)]
        features = self.glimpse(pixel_values)
        scores = self.scorer(texture, self.grid, features.float(), query_rows.float())
        scores["levels"] = self.allocator(scores["relevance"])
        return scores

    def visual_tokens(self, input_ids, pixel_values, attention_mask, counts_in, rows=None):
        scores = self.allocate(input_ids, pixel_values, attention_mask, counts_in, rows)
        self.last = scores
        return encode_regions(self.tower, pixel_values, scores["levels"], self.grid)


class _Stop(Exception):
    """Ends the scoring pass once the ranking layer's inputs are captured."""


class VisualTopKPlugin(TokenPlugin):
    """The FastV-style baseline: encode every image as the unpatched model does, rank its visual tokens by the
    attention the prompt's text (the tokens after the image) pays them in language-model layer ``layer``
    (averaged over heads and text queries), keep the top ``k`` in their original order.

    The ranking runs a scoring pass over layers ``0..layer`` on the full sequence (stopped there); the language
    model then sees only the kept tokens in every layer. (FastV proper keeps all tokens in the layers before
    ``layer`` and prunes inside the network; pruning at the input gives the language model exactly ``k`` visual
    tokens, the comparison with ``arrcoc`` at equal token counts.)"""

    name = "visual_topk"

    def __init__(self, vlm, *, k: int, layer: int = 2):
        super().__init__(vlm)
        lm = self.tower.inner.language_model
        layers = getattr(lm, "layers", None)
        if layers is None or layer >= len(layers):
            raise ValueError(f"layer={layer}: the language model has {len(layers or [])} layers; valid: "
                             f"0..{len(layers or [1]) - 1}")
        if k > self.tower.full_tokens:
            raise ValueError(f"k={k}: an image has {self.tower.full_tokens} visual tokens; valid k: "
                             f"1..{self.tower.full_tokens}")
        self.k, self.layer, self.lm = k, layer, lm
        self.attn = layers[layer].self_attn
        self.rope = getattr(sys.modules[type(self.attn).__module__], "apply_rotary_pos_emb", None)

    @torch.no_grad()
    def text_attention(self, inputs_embeds, attention_mask, input_ids) -> torch.Tensor:
        """``[B, T]``: the attention each position receives from the text after the last image token (mean over
        heads and those queries) in layer ``layer``."""
        got = {}

        def grab(module, args, kwargs):
            got.update(kwargs)
            if args:
                got["hidden_states"] = args[0]
            raise _Stop

        handle = self.attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        h = got["hidden_states"]
        a = self.attn
        b, n, _ = h.shape
        hd = getattr(a, "head_dim", None) or a.q_proj.out_features // a.config.num_attention_heads
        q = a.q_proj(h).view(b, n, -1, hd).transpose(1, 2)
        k = a.k_proj(h).view(b, n, -1, hd).transpose(1, 2)
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
        pe = got.get("position_embeddings")
        if pe is not None:
            if self.rope is None:
                raise UnsupportedArchitectureError(f"{type(a).__name__}: no apply_rotary_pos_emb in its module")
            q, k = self.rope(q, k, *pe)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / hd ** 0.5  # [b, h, n, n]
        keep = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        pad = attention_mask.bool() if attention_mask is not None else torch.ones(b, n, dtype=torch.bool,
                                                                                   device=h.device)
        keep = keep[None] & pad[:, None, :]
        probs = torch.softmax(scores.masked_fill(~keep[:, None], float("-inf")), -1).nan_to_num(0)
        is_img = input_ids == self.image_token_id
        last_img = torch.where(is_img, torch.arange(n, device=h.device), -1).amax(1, keepdim=True)
        text_q = (torch.arange(n, device=h.device)[None] > last_img) & pad
        text_q[~text_q.any(1), -1] = True  # no text after the image: the last token asks
        w = text_q.to(probs.dtype)[:, None, :, None]
        return ((probs * w).sum((1, 2)) / (w.sum((1, 2)) * probs.shape[1]).clamp_min(1))

    def visual_tokens(self, input_ids, pixel_values, attention_mask, counts_in, rows=None):
        feats = self.tower.whole(pixel_values)
        full = rewrite_inputs(input_ids, attention_mask, self.image_token_id, counts_in, list(feats), self.embed,
                              self.pad_token_id)
        att = self.text_attention(full.inputs_embeds, full.attention_mask, full.input_ids)
        rows = image_runs(full.input_ids, self.image_token_id, counts_in)
        kept = []
        for r, images in enumerate(rows):
            where = (full.input_ids[r] == self.image_token_id).nonzero().flatten()
            for j, n in enumerate(images):
                pos = where[j * counts_in[n]:(j + 1) * counts_in[n]]
                kept.append(att[r, pos].topk(self.k).indices.sort().values)
        self.last = {"kept": torch.stack(kept)}
        return [feats[n][idx] for n, idx in enumerate(kept)]
