"""MHA -> MLA conversion quality on the built-in model, before any training (CPU).

For the -68.75% and -87.5% KV budgets of the model's cache (``attnzoo.conversion.mla.budget_shapes``: latent +
rope dims per token and layer) and every conversion method (``attnzoo.patches.mla.layers.METHODS``: ``svd``
weight-only; ``pca`` the default, query-weighted RoRoPE/FreqFold on the weights + balanced activation PCA;
``transmla`` and ``mha2mla`` the two papers' recipes), the
held-out perplexity of the converted model (no uptraining), plus two exactness rows (full latent rank) and the
measured error of the deepseek_v3 export (the kv_a_layernorm anchor).

    python benchmarks/mla_quality.py [--eval-seqs 64] [--calib-seqs 64] [--out benchmarks/results/mla_quality_builtin.md]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnzoo  # noqa: E402
from attnzoo.checkpoint_io import load_causal_lm  # noqa: E402
from attnzoo.conversion.mla import BUDGETS  # noqa: E402
from attnzoo.data.model import builtin_model_dir  # noqa: E402
from attnzoo.data.sources import open_data  # noqa: E402
from attnzoo.demo.pipeline import mla_shapes  # noqa: E402
from attnzoo.evaluate import DEFAULT_EVAL_DATA, evaluate  # noqa: E402
from attnzoo.kv import kv_bytes_per_token  # noqa: E402
from attnzoo.table import format_table, markdown_table  # noqa: E402

METHODS = ("svd", "pca", "transmla", "mha2mla")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _ppl(model, data, n):
    return evaluate(model, data, num_sequences=n, decode_tokens=0).perplexity


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-seqs", type=int, default=64)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/mla_quality_builtin.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    src = builtin_model_dir()
    original = load_causal_lm(src, dtype=torch.float32).eval()
    cfg = original.config
    data = open_data(DEFAULT_EVAL_DATA, args.seq_len, vocab_size=cfg.vocab_size, option="--eval-data")
    base = _ppl(original, data, args.eval_seqs)
    kv0 = kv_bytes_per_token(original)
    rows = [{"model": "original (MHA, 4 heads x 48)", "method": "-", "latent + rope": "-", "KV B/token": kv0,
             "KV saved": "-", "perplexity": round(base, 3)}]
    calib = dict(calib="builtin:0", calib_sequences=args.calib_seqs, calib_seq_len=args.seq_len)

    def run(label, method, kv_rank, rope_dim, **extra):
        m = copy.deepcopy(original)
        opts = dict(kv_rank=kv_rank, rope_dim=rope_dim, method=method, **extra)
        if method != "svd":
            opts.update(calib)
        attnzoo.patch(m, "mla", **opts)
        kv = kv_bytes_per_token(m)
        ppl = _ppl(m, data, args.eval_seqs)
        rows.append({"model": label, "method": method, "latent + rope": f"{kv_rank} + {rope_dim}", "KV B/token": kv,
                     "KV saved": f"{100 * (1 - kv / kv0):.2f}%", "perplexity": round(ppl, 3)})
        print(rows[-1], flush=True)
        return m

    hd, layers = cfg.head_dim, cfg.num_hidden_layers
    full = 2 * cfg.num_key_value_heads * hd + 1
    run("full rank, per-head rope keys (exact)", "svd", full, hd, rope_keys="per_head")
    run("full rank, one shared rope key (the partial-RoPE intermediate)", "pca", full, hd)
    for saving in BUDGETS:
        kv_rank, rope_dim = mla_shapes(cfg, saving)
        for method in METHODS:
            run(f"MLA -{saving:.2%}", method, kv_rank, rope_dim)

    # the deepseek_v3 export: plain transformers vs the attnzoo model it came from (the anchor's error)
    kv_rank, rope_dim = mla_shapes(cfg, BUDGETS[0])
    m = copy.deepcopy(original)
    attnzoo.patch(m, "mla", kv_rank=kv_rank, rope_dim=rope_dim, method="pca", **calib)
    # the anchor's error, measured: relative change of every latent by kv_a_layernorm, 1 - sqrt(n) |c| / (beta |c|) ...
    worst = []

    def hook(mod, args, out):
        n = mod.out_features - rope_dim  # latent channels, the last one the anchor
        c, beta = out[..., : n - 1].double(), out[..., n - 1].double()
        scale = (n ** 0.5) / torch.sqrt(c.pow(2).sum(-1) + beta.pow(2) + n * 1e-6)  # RMSNorm's factor
        worst.append((1 - scale * beta / n ** 0.5).abs().max().item())  # vs the exact factor sqrt(n) / beta

    handles = [layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(hook) for layer in m.model.layers]
    with torch.no_grad():
        m(input_ids=data.batch(range(8)))
    for h in handles:
        h.remove()
    anchor_err = max(worst)
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM

        from attnzoo.patches.mla import save_deepseek_v3_model

        save_deepseek_v3_model(m, Path(tmp) / "ds")
        ds = AutoModelForCausalLM.from_pretrained(Path(tmp) / "ds").eval()
        ids = data.batch(range(8))
        with torch.no_grad():
            a, b = m(input_ids=ids).logits, ds(input_ids=ids).logits
        export_err = (a - b).abs().max().item()
        export_ppl = _ppl(ds, data, args.eval_seqs)
    rows.append({"model": "MLA -68.75% as deepseek_v3 (plain transformers)", "method": "pca",
                 "latent + rope": f"{kv_rank} + {rope_dim}", "KV B/token": layers * (kv_rank + rope_dim) * 4,
                 "KV saved": f"{100 * (1 - layers * (kv_rank + rope_dim) * 4 / kv0):.2f}%",
                 "perplexity": round(export_ppl, 3)})
    seconds = time.time() - t0
    cols = ["model", "method", "latent + rope", "KV B/token", "KV saved", "perplexity"]
    print(format_table(rows, cols, title="MHA -> MLA on the built-in model, training-free"))
    print(f"deepseek_v3 export vs the attnzoo model: max |logit difference| {export_err:.2e}; anchor: max relative "
          f"latent error {anchor_err:.2e}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    import transformers

    text = f"""# MHA -> MLA conversion quality on the built-in model (training-free, CPU)

Machine: {platform.machine()} {_cpu()}, 1 thread (a shared 2-core box), torch {torch.__version__},
transformers {transformers.__version__}. attnzoo commit {commit}, {datetime.date.today().isoformat()}; {seconds:.0f} s.
Command: `OMP_NUM_THREADS=1 python benchmarks/mla_quality.py`.

Model: the built-in Llama (4 layers, hidden 192, 4 heads x 48, MHA, RoPE on every dim, 1.5M pre-training tokens of
the built-in corpus). Perplexity on {args.eval_seqs} held-out sequences of {args.seq_len} tokens ({DEFAULT_EVAL_DATA});
calibration (methods pca, transmla, mha2mla): {args.calib_seqs} sequences of {args.seq_len} tokens of builtin:0 (the
training stream). KV bytes per token in float32, all layers. Budgets: the model's own cache per token and layer
(2 x 4 x 48 = 384 numbers) cut by 68.75% and 87.5% (attnzoo.conversion.mla.budget_shapes: latent + rope dims).
The converted layers keep one latent channel as kv_a_layernorm's anchor (this model can be a deepseek_v3 checkpoint),
so a latent of n numbers carries n - 1 of data.

{markdown_table(rows, cols)}

The deepseek_v3 export (plain `transformers.AutoModelForCausalLM`) against the attnzoo model it was saved from: max
|logit difference| {export_err:.2e} on 8 x {args.seq_len} tokens (float32; both run the same anchored layers). The
anchor's own error, measured on the same tokens: kv_a_layernorm changes every latent by at most {anchor_err:.2e}
relative to the exact (norm-free) conversion (bound: anchor_tol = 1e-6, from a weight bound on |c|).
"""
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
