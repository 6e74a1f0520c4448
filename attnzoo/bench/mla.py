"""Group ``mla``: MLA's absorbed decode against GQA decode, the bandwidth it reaches, and its prefill.

* ``decode``: one decode step of attention at 8k/16k/32k cached tokens, batch 32 and 64: MLA 512 + 64 (DeepSeek's
  shapes: 128 query heads, the latent as value) on attnzoo's split-KV kernel, against GQA with 8 KV heads of 128
  (the same 128 x 128 query width) on each SDPA kernel and on ``attnzoo.ops.attention``. ``gbps``: bytes of
  cache read per second (MLA ``576 * 2`` bytes a token, GQA ``2 * 8 * 128 * 2``); a plain device-to-device copy
  measured in the same run is the card's ceiling (``copy`` row: bytes read + written per second). Goals: MLA at
  >= 80% of the copy's GB/s, >= 2.5x faster than the fastest GQA kernel. DeepSeek's FlashMLA runs beside it where
  the ``flash_mla`` package is installed (it is not a dependency: no wheel for every CUDA and torch).
* ``prefill``: forward + backward of MLA's expanded attention (q/k head dim 192, v head dim 128, causal) on every
  dense backend that serves it, against dense attention of head dim 160 (the same matmul FLOPs: 192 + 128 =
  2 x 160). Goal: within 1.2x of dense.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from attnzoo import ops
from attnzoo.ops.mla import last_latent_decision, latent_attention

from .measure import Case, Options, measure
from .record import Row
from .timing import flops_attention

TITLE = "MLA absorbed decode (split-KV Triton) vs GQA-8 decode: GB/s of cache read, speed-up; MLA prefill vs dense"
SECTIONS = {
    "decode": "decode step at 8k/16k/32k, batch 32/64: MLA 512+64, 128 heads vs GQA-8x128 (SDPA kernels), + copy",
    "prefill": "MLA expanded prefill fwd+bwd (qk 192 / v 128, causal) vs dense attention at equal FLOPs (d 160)",
    "generate": "one decode step of a 4-layer DeepSeek-V3 model at 16k: transformers' (re-expands the cache) vs "
                "absorb_deepseek_attention (absorbed), tokens/s",
}
PEERS = ("ceiling",)
EXTRA_COLUMNS = ("cache_gb", "pct_of_copy", "speedup_vs_gqa", "vs_dense", "tokens_per_s", "speedup_vs_hf")

__all__ = ["run", "summary", "TITLE", "SECTIONS", "PEERS"]

GQA_KERNELS = {"gqa-sdpa-flash": "FLASH_ATTENTION", "gqa-sdpa-cudnn": "CUDNN_ATTENTION",
               "gqa-sdpa-efficient": "EFFICIENT_ATTENTION"}
ROUNDS = 3


def _shapes(o: Options) -> dict:
    if o.smoke:
        return dict(heads=8, kv_rank=64, rope_dim=16, kv_heads=2, head_dim=16, lens=[256], batches=[2],
                    copy_bytes=16 << 20)
    return dict(heads=128, kv_rank=512, rope_dim=64, kv_heads=8, head_dim=128, lens=[8192, 16384, 32768],
                batches=[32, 64], copy_bytes=1 << 30)


def _sdpa(kernel: str, q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _latent_backend() -> str:
    """The latent op's backend, and for the split-KV kernel the configuration it ran and where that came from
    (the tuned table, the first-call tuner, the heuristic)."""
    d = last_latent_decision()
    if d is None:
        return ""
    if d.backend != "triton":
        return d.backend
    from attnzoo.ops.mla.triton_decode import last_plan

    plan = last_plan()
    if plan is None:
        return d.backend
    c, source = plan
    variant = "vhalf" if c.value_split == 2 else "whole"
    return (f"triton {source}: {variant} h{c.block_h} n{c.block_n} w{c.num_warps} s{c.num_stages} "
            f"x{c.splits}")


def _dense_backend() -> str:
    d = ops.last_decision()
    return d.backend if d is not None else ""


def _flash_mla():
    """DeepSeek's FlashMLA package where it is installed (it has no wheel for every CUDA/torch; absent: no row)."""
    import importlib.util

    try:
        return importlib.util.find_spec("flash_mla")
    except (ImportError, ValueError):
        return None


def _flash_mla_step(o: Options, b: int, n: int, h: int, r: int, dr: int, scale: float):
    """FlashMLA's decode (its documented API: a paged cache of 64-token blocks, ``[c; k_rope]`` in one tensor)."""
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata

    blocks = -(-n // 64)
    q = torch.randn(b, 1, h, r + dr, device=o.device, dtype=o.dtype)
    kv = torch.randn(b * blocks, 64, 1, r + dr, device=o.device, dtype=o.dtype)
    table = torch.arange(b * blocks, device=o.device, dtype=torch.int32).view(b, blocks)
    lens = torch.full((b,), n, device=o.device, dtype=torch.int32)
    meta, splits = get_mla_metadata(lens, h, 1)
    return lambda: flash_mla_with_kvcache(q, kv, table, lens, r, meta, splits, softmax_scale=scale, causal=True)[0]


def copy_case(o: Options, nbytes: int) -> list[Row]:
    """The card's practical bandwidth: one device-to-device copy (GB/s = bytes read + written per second)."""
    def make():
        src = torch.empty(nbytes, dtype=torch.uint8, device=o.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    rows = measure(o, "decode", 0, [Case(f"copy:{nbytes >> 20}MiB", make)], modes=("fwd",), rounds=ROUNDS)
    for r in rows:
        if r.ok:
            r.gbps = round(2 * nbytes / r.ms / 1e6, 1)
    return rows


def decode_cases(o: Options) -> list[Row]:
    s = _shapes(o)
    h, r, dr, kvh, d = s["heads"], s["kv_rank"], s["rope_dim"], s["kv_heads"], s["head_dim"]
    elem = torch.empty((), dtype=o.dtype).element_size()
    rows = copy_case(o, s["copy_bytes"])
    scale = (d + dr) ** -0.5  # DeepSeek: 1/sqrt(nope 128 + rope 64)
    for n in s["lens"]:
        for b in s["batches"]:
            tag = f"B{b}-S{n}"
            mla_bytes = b * n * (r + dr) * elem
            gqa_bytes = b * n * 2 * kvh * d * elem

            def make_mla(b=b, n=n):
                q_lat = torch.randn(b, h, 1, r, device=o.device, dtype=o.dtype)
                q_rope = torch.randn(b, h, 1, dr, device=o.device, dtype=o.dtype)
                c = torch.randn(b, n, r, device=o.device, dtype=o.dtype)
                k_rope = torch.randn(b, n, 1, dr, device=o.device, dtype=o.dtype)
                return lambda: latent_attention(q_lat, q_rope, c, k_rope, scale=scale)

            cases = [Case(f"attnzoo-mla:{tag}", make_mla, backend=_latent_backend,
                          extra={"cache_gb": round(mla_bytes / 1e9, 3)})]
            if o.cuda and _flash_mla() is not None:
                cases.append(Case(f"flashmla:{tag}", lambda b=b, n=n: _flash_mla_step(o, b, n, h, r, dr, scale),
                                  backend="flash_mla", extra={"cache_gb": round(mla_bytes / 1e9, 3)}))

            def gqa_inputs(b=b, n=n):
                q = torch.randn(b, h, 1, d, device=o.device, dtype=o.dtype)
                k = torch.randn(b, kvh, n, d, device=o.device, dtype=o.dtype)
                return q, k, torch.randn_like(k)

            for label, kernel in GQA_KERNELS.items() if o.cuda else ():
                def make(kernel=kernel, gqa_inputs=gqa_inputs):
                    q, k, v = gqa_inputs()
                    return lambda: _sdpa(kernel, q, k, v)
                cases.append(Case(f"{label}:{tag}", make, backend=kernel.lower(),
                                  extra={"cache_gb": round(gqa_bytes / 1e9, 3)}))

            def make_zoo(gqa_inputs=gqa_inputs):
                q, k, v = gqa_inputs()
                return lambda: ops.attention(q, k, v)
            cases.append(Case(f"gqa-attnzoo:{tag}", make_zoo, backend=_dense_backend,
                              extra={"cache_gb": round(gqa_bytes / 1e9, 3)}))
            for row in measure(o, "decode", n, cases, modes=("fwd",), rounds=ROUNDS):
                if row.ok:
                    nbytes = gqa_bytes if row.name.startswith("gqa-") else mla_bytes
                    row.gbps = round(nbytes / row.ms / 1e6, 1)
                    row.extra["batch"] = b
                rows.append(row)
            if o.cuda:
                torch.cuda.empty_cache()
    return rows


def prefill_cases(o: Options) -> list[Row]:
    rows: list[Row] = []
    h, dqk, dv, dd = (4, 48, 32, 40) if o.smoke else (16, 192, 128, 160)
    backends = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex") if o.cuda else ("sdpa_flash", "sdpa_math")
    for n in [256] if o.smoke else [4096, 8192]:
        b = 1 if o.smoke else max(1, 16384 // n)
        tag = f"B{b}H{h}"

        def mla_inputs(b=b, n=n):
            q = torch.randn(b, h, n, dqk, device=o.device, dtype=o.dtype, requires_grad=True)
            k = torch.randn(b, h, n, dqk, device=o.device, dtype=o.dtype, requires_grad=True)
            v = torch.randn(b, h, n, dv, device=o.device, dtype=o.dtype, requires_grad=True)
            return q, k, v

        cases = []

        def make_mla(mla_inputs=mla_inputs):
            q, k, v = mla_inputs()
            return lambda: ops.attention(q, k, v, causal=True)
        cases.append(Case(f"attnzoo-mla-prefill:{tag}", make_mla, backend=_dense_backend))
        for name in backends:
            def make_forced(name=name, mla_inputs=mla_inputs):
                q, k, v = mla_inputs()
                return lambda: ops.attention(q, k, v, causal=True, backend=name)
            cases.append(Case(f"mla-prefill-{name}:{tag}", make_forced, backend=name))

        def make_dense(b=b, n=n):
            q, k, v = (torch.randn(b, h, n, dd, device=o.device, dtype=o.dtype, requires_grad=True)
                       for _ in range(3))
            return lambda: ops.attention(q, k, v, causal=True)
        cases.append(Case(f"dense-d{dd}:{tag}", make_dense, backend=_dense_backend))
        fl = flops_attention(b, h, n, n, (dqk + dv) // 2, True)
        for c in cases:
            c.flops = fl
        rows += measure(o, "prefill", n, cases, rounds=ROUNDS)
    return rows


def _deepseek_model(o: Options):
    """A random 4-layer DeepSeek-V3 (dense MLP layers; attention at DeepSeek-V3's per-head shapes, 16 heads)."""
    import transformers as tf

    small = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=8,
                 qk_nope_head_dim=16, v_head_dim=16, vocab_size=128, num_hidden_layers=2)
    full = dict(hidden_size=2048, intermediate_size=4096, num_attention_heads=16, kv_lora_rank=512,
                qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=32000, num_hidden_layers=4)
    shape = small if o.smoke else full
    cfg = tf.DeepseekV3Config(**shape, num_key_value_heads=shape["num_attention_heads"], q_lora_rank=None,
                              first_k_dense_replace=shape["num_hidden_layers"], n_routed_experts=1, n_group=1,
                              topk_group=1, num_experts_per_tok=1, moe_intermediate_size=64,
                              max_position_embeddings=32768, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.DeepseekV3ForCausalLM(cfg).to(o.device, o.dtype).eval()


#: the converted small model of the generate section: Llama-3.2-1B's attention shapes (hidden 2048, 32 heads of 64,
#: 8 KV heads: 1,024 cached numbers per token and layer) in 4 layers, converted to MLA with 288 + 32 (-68.75%)
LLAMA_KV = dict(kv_rank=288, rope_dim=32)


def _llama_kv(o: Options) -> dict:
    return dict(kv_rank=24, rope_dim=8) if o.smoke else LLAMA_KV


def _llama_model(o: Options, convert: bool):
    """A random 4-layer Llama (Llama-3.2-1B's attention shapes; 2 layers of width 64 for ``--smoke``), with
    ``convert`` patched to MLA by the weight-only joint SVD (no calibration text: speed, not quality)."""
    import transformers as tf

    import attnzoo

    shape = (dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=128, num_hidden_layers=2) if o.smoke else
             dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=32000, num_hidden_layers=4))
    cfg = tf.LlamaConfig(**shape, max_position_embeddings=32768, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    if convert:
        attnzoo.patch(model, "mla", method="svd", **_llama_kv(o))
    return model.to(o.device, o.dtype)


def generate_cases(o: Options) -> list[Row]:
    """Per-token decode time with a prefilled cache of ``n`` tokens (the cache is cropped back after each step,
    so every step decodes at the same length; transformers grows a cache layer by concatenation, in all): a
    DeepSeek-V3 model with transformers' attention and absorbed, and a small Llama against itself converted to
    MLA (:data:`LLAMA_KV`)."""
    from attnzoo.hf_compat import model_cache_kwarg, output_cache
    from attnzoo.patches.hf import absorb_deepseek_attention

    b, n = (2, 64) if o.smoke else (8, 16384)
    rows: list[Row] = []
    cases = []

    def deepseek(absorbed):
        model = _deepseek_model(o)
        if absorbed:
            absorb_deepseek_attention(model)
        return model

    mla = "mla {kv_rank}+{rope_dim}".format(**_llama_kv(o))
    for label, build in (("hf-deepseek-v3", lambda: deepseek(False)), ("attnzoo-mla-absorbed", lambda: deepseek(True)),
                         ("llama-original", lambda: _llama_model(o, False)),
                         (f"llama-converted({mla})", lambda: _llama_model(o, True))):
        def make(build=build):
            model = build()
            ids = torch.randint(3, model.config.vocab_size, (b, n), device=o.device)
            with torch.no_grad():
                cache = output_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
            tok = ids[:, -1:]
            key = model_cache_kwarg(model)

            def step():
                out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{key: cache}).logits
                for layer in cache.layers:  # back to n positions (views; the next step concatenates anyway)
                    layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
                return out
            return step
        fused = label.startswith(("attnzoo", "llama-converted")) and o.cuda
        cases.append(Case(f"{label}:B{b}-S{n}", make, backend="triton" if fused else ""))
    for row in measure(o, "generate", n, cases, modes=("fwd",), rounds=ROUNDS):
        if row.ok:
            row.extra["tokens_per_s"] = round(b / row.ms * 1e3, 1)
        rows.append(row)
    return rows


def run(o: Options) -> list[Row]:
    rows: list[Row] = []
    for section, fn in (("decode", decode_cases), ("prefill", prefill_cases), ("generate", generate_cases)):
        if o.wants(section):
            o.log(f"== mla: {section}")
            rows += fn(o)
    annotate(rows)
    return rows


def annotate(rows: list[Row]) -> None:
    """``pct_of_copy`` on every decode row with GB/s, ``speedup_vs_gqa`` on MLA's (fastest GQA ms / MLA ms),
    ``vs_dense`` on the prefill rows (dense ms / the row's ms: 1.0 = as fast; the goal is >= 1/1.2)."""
    copy = next((r for r in rows if r.group == "decode" and r.name.startswith("copy") and r.ok), None)
    gqa: dict = {}
    dense: dict = {}
    for r in rows:
        if not r.ok:
            continue
        key = (r.group, r.name.split(":", 1)[-1], r.mode)
        if r.name.startswith("gqa-") and (key not in gqa or r.ms < gqa[key].ms):
            gqa[key] = r
        if r.name.startswith("dense-"):
            dense[key] = r
    for r in rows:
        if not r.ok:
            continue
        key = (r.group, r.name.split(":", 1)[-1], r.mode)
        if copy is not None and r.gbps and not r.name.startswith("copy"):
            r.extra["pct_of_copy"] = round(100 * r.gbps / copy.gbps, 1)
        if r.name.startswith("attnzoo-mla:") and key in gqa:
            r.extra["speedup_vs_gqa"] = round(gqa[key].ms / r.ms, 2)
            r.note = f"{gqa[key].ms / r.ms:.2f}x {gqa[key].name.split(':')[0]}"
        if r.group == "prefill" and not r.name.startswith("dense-") and key in dense:
            r.extra["vs_dense"] = round(dense[key].ms / r.ms, 3)
        base = ("hf-deepseek-v3" if r.name.startswith("attnzoo-mla-absorbed:") else
                "llama-original" if r.name.startswith("llama-converted") else None)
        if base is not None:
            hf = next((x for x in rows if x.ok and x.name == f"{base}:{key[1]}" and x.mode == r.mode), None)
            if hf is not None:
                r.extra["speedup_vs_hf"] = round(hf.ms / r.ms, 2)


def summary(rows: list[Row], peers: list[Row], out_dir: str | None = None, stem: str = "") -> list[str]:
    """The goals, row by row: GB/s against the copy, speed-up over GQA, prefill against dense."""
    from ..table import markdown_table

    lines: list[str] = []
    dec = [r for r in rows if r.name.startswith("attnzoo-mla:") and r.ok]
    copy = next((r for r in rows if r.name.startswith("copy") and r.ok), None)
    if dec:
        table = [{"case": r.name.split(":", 1)[1], "ms": r.ms, "gpu_ms": r.gpu_ms, "GB/s": r.gbps,
                  "% of copy": r.extra.get("pct_of_copy"), "x GQA": r.extra.get("speedup_vs_gqa"),
                  "fastest GQA": r.note, "backend": r.backend} for r in dec]
        worst_bw = min((r.extra.get("pct_of_copy", 0) for r in dec), default=0)
        worst_x = min((r.extra.get("speedup_vs_gqa", 0) for r in dec), default=0)
        lines += ["## MLA decode against its goals", "",
                  f"Copy ceiling: {copy.gbps if copy else '?'} GB/s (read + write). Lowest MLA bandwidth: "
                  f"{worst_bw}% of the copy (goal >= 80%); lowest speed-up over the fastest GQA-8 kernel: "
                  f"{worst_x}x (goal >= 2.5x; the cache is {2 * 8 * 128 / 576:.2f}x smaller).", "",
                  markdown_table(table), ""]
    pre = [r for r in rows if r.group == "prefill" and "vs_dense" in r.extra]
    if pre:
        best = {}
        for r in pre:
            key = (r.n, r.mode)
            if key not in best or r.extra["vs_dense"] > best[key].extra["vs_dense"]:
                best[key] = r
        table = [{"n": r.n, "mode": r.mode, "fastest MLA path": r.name.split(":")[0], "backend": r.backend,
                  "ms": r.ms, "vs dense": r.extra["vs_dense"]} for r in best.values()]
        lines += ["## MLA prefill against dense attention at equal FLOPs", "",
                  "`vs dense`: ms of dense attention of head dim (qk + v) / 2 over MLA's ms (goal >= 0.83, i.e. within "
                  "1.2x).", "", markdown_table(table)]
    gen = [r for r in rows if "speedup_vs_hf" in r.extra]
    if gen:
        lines += ["", f"## Decode with {gen[0].n} cached tokens: transformers vs absorbed MLA", ""]
        for r in gen:
            against = ("transformers' DeepseekV3Attention" if r.name.startswith("attnzoo") else
                       "the original Llama (GQA, transformers' attention)")
            lines.append(f"- {r.name}: {r.extra['tokens_per_s']} tokens/s, {r.extra['speedup_vs_hf']}x {against}")
    return lines
