"""Group ``arrcoc``: ARR-COC's overhead, its packed region attention, the prefill of a LLaVA-shaped model with
fewer visual tokens, and a query-localisation quality proxy.

* ``overhead``: texture array + three scorers + balancer + allocator per 336 px image (the goal: <= 2 ms);
* ``region-op``: the regions of 8 images at levels (400, 144, 64, 64) (+ class token) packed into one sequence
  and attended within each region (:func:`attnzoo.ops.regions.region_attention`, a ``RegionLayout`` made once:
  capturable; image by image: varlen; sorted by length as the encoder packs them: one SDPA per run) vs SDPA on
  the regions padded to the largest, and vs SDPA with a block-diagonal mask over the packed sequence; fwd and
  fwd+bwd;
* ``prefill``: a LLaVA-shaped model with random weights (CLIP-L/336 + a Llama-7B-shaped language model in
  bfloat16 on CUDA; a tiny one elsewhere): one forward over a prompt of 4 x (40 text + 576 image tokens),
  unpatched vs ``arrcoc`` at budgets 64/128/192/576 (grid 2, levels 16..144) vs ``visual_topk`` at the same
  token counts (ranking layer 2); time and peak memory;
* ``quality``: composites of four real photographs (scikit-image's) in a 2 x 2 mosaic; the query is another view
  (a random crop, maybe mirrored, of other brightness) of one of them; the share of the visual-token budget
  (576 tokens over 4 x 4 regions, levels 16..144 in steps of 4) the allocator gives the named photograph's quadrant, for ARR-COC (the tension
  balancer at the seed's weights, and with coupling-led weights) and the baselines (an even split, information
  only, salience only, coupling only). Tower-free
  (:mod:`attnzoo.arrcoc.standalone`): no hub weights, runs on a CPU. ``visual_topk`` needs a trained language
  model to rank tokens meaningfully, so the proxy leaves it out.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time

import torch
import torch.nn.functional as F

from .measure import Case, Options, measure
from .record import Row

TITLE = "ARR-COC: scorer/allocator overhead, packed region attention, LLaVA prefill with fewer visual tokens, quality"
SECTIONS = {
    "overhead": "texture + scorers + balancer + allocator per 336 px image (goal <= 2 ms)",
    "region-op": "packed region attention vs SDPA padded per region vs SDPA with a block-diagonal mask",
    "prefill": "LLaVA-shaped prefill: unpatched vs arrcoc (64/128/192/576) vs visual_topk at equal tokens",
    "quality": "query localisation on composites of real photographs: budget share on the named photo (CPU)",
}
PEERS: tuple[str, ...] = ()
EXTRA_COLUMNS = ("per_image_ms", "visual_tokens", "seq_len", "share_pct", "top_pct", "vs_unpatched", "spread_pct")

__all__ = ["run", "summary", "TITLE", "SECTIONS", "PEERS", "llava_shaped", "composites"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
BUDGETS = (64, 128, 192, 576)
LEVELS = tuple(range(16, 145, 16))  # 4 regions of a 336 px image: 4x4 .. 12x12 (native) patches each
QUALITY_LEVELS = tuple(range(16, 145, 4))  # 16 regions, budget 576: an even split (36 = 6x6 each) is a level


# ---------------------------------------------------------------------------- overhead
def overhead_rows(o: Options) -> list[Row]:
    from ..arrcoc import RelevanceScorer, TokenBudgetAllocator, texture_array

    rows = []
    size, grid, dim = (64, 2, 32) if o.smoke else (336, 2, 4096)
    for b in (1, 8):
        def make(b=b):
            g = torch.Generator(device=o.device).manual_seed(0)
            images = torch.rand(b, 3, size, size, device=o.device, generator=g)
            feats = torch.randn(b, grid * grid, dim, device=o.device, generator=g)
            query = torch.randn(b, dim, device=o.device, generator=g)
            scorer = RelevanceScorer().to(o.device)
            alloc = TokenBudgetAllocator(192, LEVELS)

            def step():  # no host read: capturable (gpu_ms), as the plug-in calls it
                rel = scorer(texture_array(images, check=False), grid, feats, query)["relevance"]
                return alloc(rel)
            return step
        for r in measure(o, "overhead", size, [Case(f"attnzoo arrcoc scorers+allocator B={b}", make,
                                                    backend="torch", extra={"batch": b})],
                         modes=("fwd",), rounds=3):
            if r.ok:
                r.extra["per_image_ms"] = round(r.ms / b, 4)
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------- region op
def region_rows(o: Options) -> list[Row]:
    from ..ops.regions import RegionLayout, region_attention, region_backend, region_ids

    heads, d = (2, 16) if o.smoke else (16, 64)
    per_image = [26, 10, 5, 5] if o.smoke else [401, 145, 65, 65]
    lengths = per_image * (2 if o.smoke else 8)
    t, longest = sum(lengths), max(lengths)

    def packed():
        return [torch.randn(1, heads, t, d, device=o.device, dtype=o.dtype, requires_grad=True) for _ in range(3)]

    def make_zoo():
        q, k, v = packed()
        layout = RegionLayout(lengths, o.device)  # offsets on the device once: the call copies nothing (capturable)
        return lambda: region_attention(q, k, v, layout)

    def make_sorted():  # the packing ARR-COC's encoder uses: regions sorted by length, one SDPA per run
        q, k, v = packed()
        layout = RegionLayout(sorted(lengths), o.device)
        return lambda: region_attention(q, k, v, layout)

    def sorted_backend():
        q = torch.empty(1, heads, t, d, device=o.device, dtype=o.dtype)
        return region_backend(q, q, q, lengths=sorted(lengths))

    def make_padded():
        q, k, v = (torch.randn(len(lengths), heads, longest, d, device=o.device, dtype=o.dtype,
                               requires_grad=True) for _ in range(3))
        keep = torch.arange(longest, device=o.device)[None, :] < torch.tensor(lengths, device=o.device)[:, None]
        mask = keep[:, None, None, :]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def make_blockdiag():
        q, k, v = packed()
        ids = region_ids(lengths, o.device)
        mask = ids[:, None] == ids[None, :]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def backend():
        q = torch.empty(1, heads, t, d, device=o.device, dtype=o.dtype)
        return region_backend(q, q, q, lengths=lengths)

    useful = sum(n * n for n in lengths)
    cases = [Case("attnzoo region op (packed)", make_zoo, backend=backend),
             Case("attnzoo region op (packed, sorted by length)", make_sorted, backend=sorted_backend),
             Case("SDPA, regions padded to the largest", make_padded, backend="sdpa"),
             Case("SDPA, block-diagonal mask over the packed sequence", make_blockdiag, backend="sdpa")]
    for c in cases:
        c.flops = 4.0 * heads * d * useful
        c.extra = {"regions": len(lengths), "tokens": t}
    return measure(o, "region-op", t, cases, rounds=3)


# ---------------------------------------------------------------------------- prefill
def llava_shaped(o: Options):
    """A LLaVA-1.5-shaped model with random weights: CLIP-L/336 + a Llama-7B-shaped language model (bfloat16 on
    CUDA); tiny at smoke shapes."""
    if o.smoke:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=48, patch_size=4, projection_dim=16)
        text = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768)
        text = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return build_llava(vision, text, o.device, o.dtype)


def build_llava(vision: dict, text: dict, device="cpu", dtype=torch.float32):
    """A random-weight LLaVA from CLIP-vision and Llama config fields (the image token is the last id of the
    vocabulary; features of the second-to-last tower layer, as LLaVA-1.5)."""
    import transformers as tf

    side = vision["image_size"] // vision["patch_size"]
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision),
                         text_config=tf.LlamaConfig(**text, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                         image_token_id=text["vocab_size"] - 1, image_seq_length=side * side,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval()


def prefill_ids(batch: int, text: int, images: int, image_id: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, text + images]`` prompt ids: 5 text tokens, the image's ``images`` tokens, the rest of the text."""
    def words(n):
        return torch.randint(3, image_id - 1, (batch, n), generator=generator)

    return torch.cat([words(5), torch.full((batch, images), image_id), words(text - 5)], 1)


def prefill_rows(o: Options) -> list[Row]:
    from ..arrcoc.plugin import ArrcocPlugin, VisualTopKPlugin

    o.log("prefill: building the LLaVA-shaped model (random weights)")
    model = llava_shaped(o)
    vt = model.config.vision_config
    full = (vt.image_size // vt.patch_size) ** 2
    batch, text = (2, 12) if o.smoke else (4, 40)
    scale = full / 576
    budgets = sorted({max(16, int(b * scale) // 4 * 4) for b in BUDGETS}) if o.smoke else list(BUDGETS)
    levels = tuple(range(4, full // 4 + 1, 4)) if o.smoke else LEVELS
    g = torch.Generator().manual_seed(0)
    image_id = model.config.image_token_id
    ids = prefill_ids(batch, text, full, image_id, g).to(o.device)
    mask = torch.ones_like(ids)
    pixels = torch.randn(batch, 3, vt.image_size, vt.image_size, generator=g).to(o.device, o.dtype)

    def run_plain():
        return lambda: model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True).logits

    def run_plugin(plugin):
        def make():
            def step():
                r = plugin.prepare(ids, pixels, mask)
                return model(inputs_embeds=r.inputs_embeds, attention_mask=r.attention_mask, use_cache=True).logits
            return step
        return make

    cases = [Case("unpatched", run_plain, backend="hf", extra={"visual_tokens": full, "seq_len": ids.shape[1]})]
    for b in budgets:
        cases.append(Case(f"attnzoo arrcoc budget={b}", run_plugin(ArrcocPlugin(model, budget=b, levels=levels)),
                          backend="arrcoc", extra={"visual_tokens": b, "seq_len": ids.shape[1] - full + b}))
    for b in budgets:
        if b < full:
            cases.append(Case(f"visual_topk k={b}", run_plugin(VisualTopKPlugin(model, k=b, layer=2)),
                              backend="fastv-style", extra={"visual_tokens": b, "seq_len": ids.shape[1] - full + b}))
    rows = measure(o, "prefill", batch, cases, modes=("fwd",), rounds=3, rep_ms=200 if o.cuda else 50)
    base = next((r for r in rows if r.name == "unpatched" and r.ok), None)
    for r in rows:
        if base is not None and r.ok:
            r.extra["vs_unpatched"] = round(r.ms / base.ms, 3)
    return rows


# ---------------------------------------------------------------------------- quality
def _photo(name: str) -> torch.Tensor:
    from skimage import data

    x = torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1).float() / 255
    h, w = x.shape[1:]
    s = min(h, w)
    return x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


def composites(n: int, size: int = 336, seed: int = 0):
    """``n`` composites: ``(mosaic [3, size, size], query [3, size // 3, size // 3], target quadrant)``; the query
    is a random crop (50-80 % of the side) of the target photograph, mirrored half the time, brightness x 0.9-1.1."""
    rng = random.Random(seed)
    photos = {p: _photo(p) for p in PHOTOS}
    half = size // 2
    out = []
    for _ in range(n):
        names = rng.sample(PHOTOS, 4)
        tiles = [_resize(photos[p], half) for p in names]
        mosaic = torch.cat([torch.cat(tiles[:2], 2), torch.cat(tiles[2:], 2)], 1)
        target = rng.randrange(4)
        src = photos[names[target]]
        s = src.shape[1]
        side = int(s * rng.uniform(0.5, 0.8))
        y, x = rng.randrange(s - side + 1), rng.randrange(s - side + 1)
        q = src[:, y:y + side, x:x + side]
        if rng.random() < 0.5:
            q = q.flip(-1)
        out.append((mosaic, (_resize(q, size // 3) * rng.uniform(0.9, 1.1)).clamp(0, 1), target))
    return out


def quality_rows(o: Options) -> list[Row]:
    from ..arrcoc import RelevanceScorer, TokenBudgetAllocator, texture_array
    from ..arrcoc.standalone import query_features

    try:
        import skimage.data  # noqa: F401
    except ImportError as e:
        return [Row("quality", "attnzoo arrcoc (tension balancer)", 0, "quality", float("nan"),
                    error=f"needs scikit-image (pip install scikit-image): {e}")]
    n, grid, budget = (8, 4, 576) if o.smoke else (240, 4, 576)
    alloc = TokenBudgetAllocator(budget, QUALITY_LEVELS)
    scorer = RelevanceScorer()
    from ..arrcoc import TensionBalancer

    led = TensionBalancer(info_salience=0.5, coupling_info=0.9, coupling_salience=0.9)  # coupling 0.6 of relevance
    methods = {"even split (no scoring)": lambda s: torch.zeros_like(s["relevance"]),
               "information only": lambda s: s["information"], "salience only": lambda s: s["salience"],
               "coupling only": lambda s: s["coupling"], "attnzoo arrcoc (tension balancer)": lambda s: s["relevance"],
               "arrcoc, coupling-led balancer (0.5, 0.9, 0.9)":
                   lambda s: led(s["information"], s["salience"], s["coupling"]).detach()}
    share = {m: [] for m in methods}
    top = {m: [] for m in methods}
    quadrant = torch.tensor([(r // grid) // (grid // 2) * 2 + (r % grid) // (grid // 2) for r in range(grid * grid)])
    elapsed = 0.0
    from tqdm.auto import tqdm

    for mosaic, query, target in tqdm(composites(n), desc="arrcoc quality proxy", unit="composite",
                                      disable=o.smoke):
        t0 = time.perf_counter()
        with torch.no_grad():
            feats, q = query_features(mosaic[None], query, grid)
            scores = scorer(texture_array(mosaic[None]), grid, feats, q)
            alloc(scores["relevance"])
        elapsed += time.perf_counter() - t0
        for m, pick in methods.items():
            tokens = alloc(pick(scores))[0].double()
            per_quadrant = torch.zeros(4, dtype=torch.float64).index_add_(0, quadrant, tokens)
            share[m].append(per_quadrant[target].item() / tokens.sum().item())
            others = torch.cat([per_quadrant[:target], per_quadrant[target + 1:]])
            top[m].append(float(bool(per_quadrant[target] > others.max())))  # strictly the most: a tie is no hit
    ms = 1e3 * elapsed / n
    rows = []
    for m in methods:
        mean = sum(share[m]) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in share[m]) / max(1, n - 1))
        rows.append(Row("quality", m, n, "quality", round(ms, 3) if m.startswith("attnzoo") else float("nan"),
                        backend="tower-free", note=f"share {100 * mean:.1f} % +- {100 * sd / math.sqrt(n):.1f}",
                        extra={"share_pct": round(100 * mean, 1), "top_pct": round(100 * sum(top[m]) / n, 1)}))
    o.log("quality: " + ", ".join(f"{r.name} {r.extra['share_pct']} %" for r in rows))
    return rows


def run(o: Options) -> list[Row]:
    rows: list[Row] = []
    host = dataclasses.replace(o, cuda_graph=False)  # the LOD encoding reads the levels on the host
    if o.wants("overhead"):
        rows += overhead_rows(o)  # texture + scorers + allocator read nothing on the host: CUDA graph time too
    if o.wants("region-op"):
        rows += region_rows(o)
    if o.wants("prefill"):
        rows += prefill_rows(host)
    if o.wants("quality"):
        rows += quality_rows(o)
    return rows


def summary(rows: list[Row], peers: list[Row], out_dir: str, stem: str) -> list[str]:
    lines = []
    over = [r for r in rows if r.group == "overhead" and r.ok]
    if over:
        worst = max(r.extra.get("per_image_ms", r.ms) for r in over)
        lines += ["## targets", "",
                  f"- scorer + allocator overhead per image: {worst:.3f} ms at worst (goal <= 2 ms: "
                  f"{'met' if worst <= 2 else 'NOT met'})", ""]
    pre = [r for r in rows if r.group == "prefill" and r.ok]
    if pre:
        lines += ["## prefill vs the unpatched model", "",
                  "| case | visual tokens / image | time vs unpatched | peak MB |", "|---|---|---|---|"]
        lines += [f"| {r.name} | {r.extra.get('visual_tokens')} | {r.extra.get('vs_unpatched')} | {r.peak_mb} |"
                  for r in pre]
        lines.append("")
    qual = [r for r in rows if r.group == "quality" and "share_pct" in r.extra]
    if qual:
        lines += ["## quality proxy: share of the budget on the photograph the query names", "",
                  f"{qual[0].n} composites of 4 photographs (scikit-image), 4 x 4 regions, budget 576; an even split "
                  "gives 25 %.", "", "| method | share of budget | named quadrant gets strictly the most |", "|---|---|---|"]
        lines += [f"| {r.name} | {r.note.replace('share ', '')} | {r.extra['top_pct']} % |" for r in qual]
        lines.append("")
    return lines
