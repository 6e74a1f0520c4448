"""ARR-COC's host cost on the CPU: aten ops per call (the proxy for CUDA kernel launches) and host reads (syncs on
CUDA) of (1) texture + scorers + balancer + allocator at B=1, 336 px (``attnzoo bench arrcoc --sections overhead``)
and (2) ``ArrcocPlugin.prepare`` at budget 64 on a LLaVA with the bench's geometry (CLIP-L/336 patches, 24 tower
layers, a 32-layer language model, batch 4 x (40 text + 576 image tokens)) but tiny widths, plus the forward.

    python benchmarks/arrcoc_opcount.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]
from opcount import count_ops  # noqa: E402


def overhead():
    from attnzoo.arrcoc import RelevanceScorer, TokenBudgetAllocator, texture_array

    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 336, 336, generator=g)
    feats, query = torch.randn(1, 4, 4096, generator=g), torch.randn(1, 4096, generator=g)
    scorer, alloc = RelevanceScorer(), TokenBudgetAllocator(192, tuple(range(16, 145, 16)))

    def scores():
        return scorer(texture_array(images, check=False), 2, feats, query)["relevance"]

    def step():
        return alloc(scores())

    step()
    return count_ops(step), count_ops(scores)


def llava(vision_layers=24, text_layers=32):
    """The bench's LLaVA geometry (CLIP-L/336 patches, 24 tower layers, 32 language-model layers) at tiny widths."""
    from attnzoo.bench.arrcoc import build_llava

    torch.manual_seed(0)
    return build_llava(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                            num_attention_heads=2, image_size=336, patch_size=14, projection_dim=16),
                       dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048))


def prefill_inputs(batch=4, text=40):
    from attnzoo.bench.arrcoc import prefill_ids

    g = torch.Generator().manual_seed(0)
    ids = prefill_ids(batch, text, 576, 199, g)
    return ids, torch.ones_like(ids), torch.randn(batch, 3, 336, 336, generator=g)


def prefill(budget=64):
    from attnzoo.arrcoc.plugin import ArrcocPlugin, VisualTopKPlugin

    model = llava()
    ids, mask, pixels = prefill_inputs()
    plugin = ArrcocPlugin(model, budget=budget, levels=tuple(range(16, 145, 16)))
    plugin.prepare(ids, pixels, mask)
    prep = count_ops(plugin.prepare, ids, pixels, mask)
    r = plugin.prepare(ids, pixels, mask)
    fwd = count_ops(lambda: model(inputs_embeds=r.inputs_embeds, attention_mask=r.attention_mask, use_cache=True))
    plain = count_ops(lambda: model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True))
    plugin.remove()
    topk = VisualTopKPlugin(model, k=budget)
    topk.prepare(ids, pixels, mask)
    return prep, fwd, plain, count_ops(topk.prepare, ids, pixels, mask)


def show(name, c):
    top = ", ".join(f"{k} {v}" for k, v in c.ops.most_common(8))
    print(f"{name}: {c.total} aten ops ({c.kernels} not views), host reads {dict(c.host_reads) or 0}\n    top: {top}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    both, scorers_only = overhead()
    show("overhead B=1 (texture + scorers + allocator; on the CPU the allocator is the Python reference)", both)
    show("overhead B=1, texture + scorers only (on CUDA the allocator adds one Triton launch)", scorers_only)
    prep, fwd, plain, topk = prefill()
    show("prefill budget=64: plugin.prepare", prep)
    show("prefill budget=64: language model forward", fwd)
    show("prefill unpatched forward (tower + language model)", plain)
    show("visual_topk k=64: plugin.prepare (the tower, 3 scoring layers)", topk)
    print(f"({time.perf_counter() - t0:.1f} s)")
