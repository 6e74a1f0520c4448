"""Variable level-of-detail encoding: every region of an image encoded by the VLM's vision tower at the resolution
its level asks for, all regions of a batch in one packed sequence.

For region ``r`` of image ``n`` with ``levels[n, r] = t`` tokens, :func:`encode_regions`

1. crops the region from the (processor-normalised) ``pixel_values`` (the ``grid x grid`` partition of
   :func:`attnzoo.arrcoc.region_index`) and resizes it (bilinear, antialiased) to ``rows x cols`` patches,
   ``rows * cols = t`` (:func:`attnzoo.arrcoc.grid_shape`: 80 tokens of a square region are 8 x 10);
2. embeds the patches with the tower's own patch embedding and adds its position embeddings resampled
   (bicubic, as ``transformers``' ``interpolate_pos_encoding``) to ``rows x cols``, plus the class token when the
   tower has one: each region is seen as a whole picture, as LLaVA-NeXT's AnyRes crops are;
3. packs all regions of the batch one after another, sorted by length, into a single ``[1, T, D]`` sequence (no
   padding to the largest region) and runs the tower's layers up to ``vision_feature_layer`` on it; the attention
   runs within each region through :func:`attnzoo.ops.regions.region_attention_tokens` (one SDPA call per run of
   equal-length regions, or varlen flash attention on CUDA when there are many runs), with one
   :class:`~attnzoo.ops.regions.RegionLayout` for every layer. CLIP/SigLIP layers run lean
   (:meth:`VisionTower._lean_layer`: their own modules, q/k/v fused, 2-D); other layers run as transformers'
   modules with ``"attnzoo_regions"`` as their attention implementation (:func:`use_region_kernel`);
4. drops the class tokens and applies the VLM's multimodal projector: ``t`` visual tokens per region, in region
   order (row-major), each region's tokens row-major.

An image whose every region gets exactly its native token count (the tower's full count in total) is encoded
whole, as the unpatched model does (one attention over the full image: a full budget reproduces the unpatched
model's logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UnsupportedArchitectureError
from ..ops.regions import RegionLayout, region_attention, region_attention_tokens
from .allocator import grid_shape
from .scorers import region_index

__all__ = ["Regions", "REGION_KERNEL", "use_region_kernel", "region_hf_attention", "VisionTower", "encode_regions"]

REGION_KERNEL = "attnzoo_regions"


@dataclass(frozen=True)
class Regions:
    """The ``attention_mask`` the vision tower's layers receive for a packed sequence: its
    :class:`~attnzoo.ops.regions.RegionLayout` (made once per encoding: every layer reuses its device offsets)."""

    layout: RegionLayout

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.layout.lengths


def region_hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``transformers`` attention function: within regions for a :class:`Regions` mask, else transformers' own
    SDPA path (what the tower ran before: the whole-image encoding stays the unpatched model's)."""
    if isinstance(attention_mask, Regions):
        if dropout:
            raise ValueError(f"region attention has no dropout (got {dropout}); call the tower in eval mode")
        out = region_attention(query, key, value, attention_mask.layout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def use_region_kernel(tower) -> None:
    """Register ``"attnzoo_regions"`` with ``transformers`` and make it ``tower``'s attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REGION_KERNEL, region_hf_attention)  # idempotent: the same function each time
    AttentionMaskInterface.register(REGION_KERNEL, sdpa_mask)
    tower.set_attn_implementation(REGION_KERNEL)


class VisionTower:
    """What :func:`encode_regions` needs of a LLaVA-style model: the tower's embeddings and layers, the feature
    layer(s) and strategy, and the projector. Raises ``UnsupportedArchitectureError`` for other towers."""

    def __init__(self, vlm):
        inner = getattr(vlm, "model", vlm)
        tower = getattr(inner, "vision_tower", None)
        vm = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel.vision_model
        emb = getattr(vm, "embeddings", None)
        if emb is None or not hasattr(emb, "patch_embedding") or not hasattr(getattr(vm, "encoder", None), "layers"):
            raise UnsupportedArchitectureError(
                f"{type(vlm).__name__}: arrcoc needs a LLaVA-style model whose vision tower is CLIP- or SigLIP-like "
                "(model.vision_tower[.vision_model].{embeddings.patch_embedding, encoder.layers}), e.g. "
                "LlavaForConditionalGeneration")
        cfg = vlm.config
        self.vlm, self.inner, self.tower, self.vm, self.emb = vlm, inner, tower, vm, emb
        self.projector = inner.multi_modal_projector
        self.patch = int(emb.patch_size)
        self.image_size = int(emb.image_size)
        self.side = self.image_size // self.patch  # native patches per side
        self.cls = getattr(emb, "class_embedding", None)
        self.pre_norm = getattr(vm, "pre_layrnorm", None)
        layer = getattr(cfg, "vision_feature_layer", -2)
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        if self.strategy not in ("default", "full") or (self.strategy == "full" and self.cls is not None):
            raise UnsupportedArchitectureError(
                f"vision_feature_select_strategy={self.strategy!r} keeps the class token: arrcoc encodes each region "
                "with its own class token and drops it, so it serves 'default' (towers with a class token) and "
                "towers without one")
        n_layers = len(vm.encoder.layers)
        self.layer_index = [f if f >= 0 else n_layers + 1 + f for f in self.feature_layers]
        self._pos_cache: dict = {}
        self._qkv_cache: dict = {}

    @property
    def full_tokens(self) -> int:
        """Visual tokens per image of the unpatched model."""
        return self.side * self.side

    def native_tokens(self, grid: int) -> int | None:
        """Tokens of a region at the tower's native resolution (None when ``grid`` does not divide the patches)."""
        return (self.side // grid) ** 2 if self.side % grid == 0 else None

    def whole(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The unpatched model's visual tokens ``[N, full_tokens, D_lm]``."""
        out = self.inner.get_image_features(pixel_values=pixel_values,
                                            vision_feature_layer=self.feature_layers[0] if len(
                                                self.feature_layers) == 1 else self.feature_layers,
                                            vision_feature_select_strategy=self.strategy)
        feats = getattr(out, "pooler_output", out)
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def _pos(self, rows: int, cols: int, cache: dict | None = None) -> torch.Tensor:
        """``(class position or None, [rows * cols, D] resampled patch positions)``, kept per grid shape on the
        tower for as long as the position table is the same tensor, unchanged (its version counter), dtype and
        device (``cache``: an explicit dict instead)."""
        w = self.emb.position_embedding.weight
        if cache is None:
            cache = self._pos_cache
            if cache.get("key") != (w.data_ptr(), w._version, w.dtype, w.device):
                cache.clear()
                cache["key"] = (w.data_ptr(), w._version, w.dtype, w.device)
        got = cache.get((rows, cols))
        if got is None:
            w = self.emb.position_embedding.weight
            patch_pos = w[1:] if self.cls is not None else w
            if (rows, cols) == (self.side, self.side):
                grid_pos = patch_pos
            else:
                d = patch_pos.shape[-1]
                g = patch_pos.reshape(1, self.side, self.side, d).permute(0, 3, 1, 2)
                grid_pos = F.interpolate(g.float(), size=(rows, cols), mode="bicubic",
                                         align_corners=False).to(w.dtype).permute(0, 2, 3, 1).reshape(rows * cols, d)
            got = cache[(rows, cols)] = (w[:1] if self.cls is not None else None, grid_pos)
        return got

    def embed(self, crops: torch.Tensor, rows: int, cols: int, cache: dict | None = None) -> torch.Tensor:
        """Crops ``[n, 3, h, w]`` -> ``[n, (1 +) rows * cols, D]`` (class token first when the tower has one)."""
        size = (rows * self.patch, cols * self.patch)
        if tuple(crops.shape[-2:]) != size:
            crops = F.interpolate(crops, size=size, mode="bilinear", align_corners=False, antialias=True)
        w = self.emb.patch_embedding.weight
        x = self.emb.patch_embedding(crops.to(w.dtype)).flatten(2).transpose(1, 2)
        cls_pos, grid_pos = self._pos(rows, cols, cache)
        x = x + grid_pos
        if self.cls is not None:
            cls = (self.cls + cls_pos[0]).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], 1)
        return x

    def run_layers(self, packed: torch.Tensor, lengths=None) -> torch.Tensor:
        """The tower's layers on a packed ``[1, T, D]`` whose regions have ``lengths`` (a list or a
        :class:`~attnzoo.ops.regions.RegionLayout`), or on a batch ``[N, L, D]`` of whole images (``lengths``
        None: transformers' own attention) -> the selected feature layer(s), concatenated."""
        h = self.pre_norm(packed) if self.pre_norm is not None else packed
        if lengths is None:
            mask = None
        else:
            mask = Regions(lengths if isinstance(lengths, RegionLayout) else RegionLayout(lengths, packed.device))
        layers = self.vm.encoder.layers[:max(self.layer_index)]
        lean = not self.tower.training and all(_lean(layer) for layer in layers)
        shape = h.shape
        if lean:
            h = h.reshape(-1, shape[-1])  # 2-D through the layers: no views around each linear
        outs = {0: h}
        for i, layer in enumerate(layers):
            if lean:
                h = self._lean_layer(layer, h, shape, mask.layout if mask is not None else None)
            else:
                h = layer(h, mask)
                h = h[0] if isinstance(h, tuple) else h
            outs[i + 1] = h
        out = outs[self.layer_index[0]] if len(self.layer_index) == 1 else torch.cat(
            [outs[i] for i in self.layer_index], -1)
        return out.view(*shape[:-1], -1)

    def _qkv(self, attn) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attn``'s q, k, v projections as one ``[3 D, D]`` weight (and bias), made once and again only when one
        of them changes (their data pointers and version counters)."""
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        tensors = [t for m in parts for t in (m.weight, m.bias) if t is not None]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        got = self._qkv_cache.get(id(attn))
        if got is None or got[0] != key:
            with torch.no_grad():
                w = torch.cat([m.weight for m in parts])
                b = torch.cat([m.bias for m in parts]) if all(m.bias is not None for m in parts) else None
            got = self._qkv_cache[id(attn)] = (key, w, b)
        return got[1], got[2]

    def _lean_layer(self, layer, h: torch.Tensor, shape, layout) -> torch.Tensor:
        """One CLIP/SigLIP encoder layer (pre-norm attention and MLP, transformers' own modules and weights) on
        ``h [B * T, D]``, with the q/k/v projections fused and no per-linear reshapes: about half the ops of the
        transformers layer (the tower is host-bound at LLaVA's sizes). ``layout``: the packed regions, else
        ``shape`` ``[B, T, D]`` holds whole images."""
        a = layer.self_attn
        heads, d = a.num_heads, a.head_dim
        w, b = self._qkv(a)
        n = h.shape[0]
        qkv = F.linear(layer.layer_norm1(h), w, b).view(n, 3, heads, d)
        q, k, v = qkv.unbind(1)  # token-major [B * T, H, d]
        if layout is not None:
            o = region_attention_tokens(q, k, v, layout, scale=a.scale)
        else:
            bsz, t = shape[0], shape[1]
            q, k, v = (x.view(bsz, t, heads, d).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, scale=a.scale).transpose(1, 2)
        h = h + a.out_proj(o.reshape(n, heads * d))
        return h + layer.mlp(layer.layer_norm2(h))


def _lean(layer) -> bool:
    """Whether :meth:`VisionTower._lean_layer` computes this layer as transformers does: a CLIP/SigLIP-style
    pre-norm encoder layer with linear q/k/v/out projections, no causal mask."""
    a = getattr(layer, "self_attn", None)
    return (all(hasattr(layer, n) for n in ("layer_norm1", "layer_norm2", "mlp")) and a is not None
            and all(isinstance(getattr(a, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
            and isinstance(getattr(a, "num_heads", None), int) and isinstance(getattr(a, "head_dim", None), int)
            and getattr(a, "scale", None) is not None and not getattr(a, "is_causal", False)
            and a.num_heads * a.head_dim == a.q_proj.out_features == a.k_proj.out_features)


def _boxes(height: int, width: int, grid: int) -> list[tuple[int, int, int, int]]:
    """``(top, bottom, left, right)`` of each region, row-major (as :func:`region_index`)."""
    ys = [i * height // grid for i in range(grid)] + [height]
    xs = [j * width // grid for j in range(grid)] + [width]
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(grid) for j in range(grid)]


def encode_regions(tower: VisionTower, pixel_values: torch.Tensor, levels: torch.Tensor, grid: int,
                   *, allow_whole: bool = True) -> list[torch.Tensor]:
    """Visual tokens of each image at its regions' levels (module docstring): ``pixel_values [N, 3, H, W]`` as
    the processor made them, ``levels [N, grid * grid]`` tokens per region -> a list of ``N`` tensors
    ``[levels[n].sum(), D_lm]``. ``allow_whole``: encode an image whose regions are all at their native count
    whole (the unpatched model's tokens).

    Host cost: one read of ``levels`` (the shapes depend on it); one resize + patch embedding per (crop size,
    patch grid) group of regions; the regions packed sorted by length, so the tower's attention runs once per
    run of equal lengths (:func:`attnzoo.ops.regions.region_attention`, one :class:`RegionLayout` for all
    layers); one projector call and one gather back into region order."""
    n_img, _, height, width = pixel_values.shape
    if levels.shape != (n_img, grid * grid):
        raise ValueError(f"levels has shape {tuple(levels.shape)}: expected [{n_img}, {grid * grid}]")
    region_index(height, width, grid)  # checks the grid fits the image
    lv = levels.tolist()
    native = tower.native_tokens(grid)
    whole = [allow_whole and native is not None and all(t == native for t in row) for row in lv]
    boxes = _boxes(height, width, grid)
    # group the regions by (crop size, target grid) so that each group is one resize and one patch embedding
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for n in range(n_img):
        if whole[n]:
            continue
        for r, (t, b, left, right) in enumerate(boxes):
            shape = grid_shape(lv[n][r], (right - left) / (b - t))
            groups.setdefault((b - t, right - left, *shape), []).append((n, r))
    out: list[torch.Tensor | None] = [None] * n_img
    if groups:
        skip = 1 if tower.cls is not None else 0
        # sorted by tokens: equal lengths are adjacent, one attention call per run of them
        keys = sorted(groups, key=lambda g: (g[2] * g[3], g))
        slabs, lengths, where = [], [], {}
        every = [(n, r) for n in range(n_img) for r in range(grid * grid)]
        for key in keys:
            members = groups[key]
            rows, cols = key[2], key[3]
            if members == every and height % grid == 0 and width % grid == 0:  # every region alike: one reshape
                crops = pixel_values.unflatten(2, (grid, height // grid)).unflatten(4, (grid, width // grid))
                crops = crops.permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
            else:
                crops = torch.stack([pixel_values[n, :, boxes[r][0]:boxes[r][1], boxes[r][2]:boxes[r][3]]
                                     for n, r in members])
            x = tower.embed(crops, rows, cols)  # [m, skip + rows * cols, D]
            for j, nr in enumerate(members):
                where[nr] = (len(slabs), j)
            slabs.append(x)
            lengths += [x.shape[1]] * len(members)
        packed = torch.cat([x.flatten(0, 1) for x in slabs]) if len(slabs) > 1 else slabs[0].flatten(0, 1)
        feats = tower.run_layers(packed.unsqueeze(0), RegionLayout(lengths, packed.device))[0]
        # back to region order, class tokens dropped: one cat of views, one projector call
        views, start = [], 0
        for x in slabs:
            m, length = x.shape[0], x.shape[1]
            views.append(feats[start:start + m * length].view(m, length, -1)[:, skip:])
            start += m * length
        order = [(n, r) for n in range(n_img) if not whole[n] for r in range(grid * grid)]
        tokens = tower.projector(torch.cat([views[where[k][0]][where[k][1]] for k in order]))
        kept = [n for n in range(n_img) if not whole[n]]
        for n, t in zip(kept, tokens.split([sum(lv[n]) for n in kept])):
            out[n] = t
    whole_idx = [n for n in range(n_img) if whole[n]]
    if whole_idx:
        for n, t in zip(whole_idx, tower.whole(pixel_values[whole_idx])):
            out[n] = t
    return out
