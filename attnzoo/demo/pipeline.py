"""The main job end to end on the built-in model: convert MHA -> GQA, evaluate, uptrain, evaluate, report."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint_io import load_causal_lm, quiet_hf, resolve_model_dir
from ..data.sources import open_data
from ..data.tokenizer import load_tokenizer
from ..evaluate import DEFAULT_EVAL_DATA, evaluate
from . import report

__all__ = ["DemoOptions", "run_demo", "OUTPUT_FILES", "convert_gqa", "convert_mla", "TARGETS"]

TARGETS = ("gqa", "mla")

OUTPUT_FILES = ("demo_results.json", "demo_table.md", "demo.png")


def convert_gqa(original, groups: int, method: str):
    """A converted copy of ``original`` (left unchanged): ``attnzoo.patch(copy, "gqa", ...)``, plus
    the note for ``uptrain --lora`` that ``k_proj``/``v_proj`` are new weights (they train fully)."""
    from .. import patch
    from ..checkpoint_io import update_metadata

    model = copy.deepcopy(original)
    patch(model, "gqa", groups=groups, method=method)
    update_metadata(model, new_modules=["k_proj", "v_proj"])
    return model.eval()


def convert_mla(original, kv_rank: int, rope_dim: int, method: str, calib: str | None = None):
    """A converted copy of ``original``: ``attnzoo.patch(copy, "mla", ...)`` (which records the modules it computed,
    trained fully by ``uptrain --lora``)."""
    from .. import patch

    model = copy.deepcopy(original)
    patch(model, "mla", kv_rank=kv_rank, rope_dim=rope_dim, method=method, calib=calib)
    return model.eval()


def mla_shapes(config, saving: float) -> tuple[int, int]:
    """``(kv_rank, rope_dim)`` of the MLA budget ``saving`` for ``config``'s attention (``budget_shapes``)."""
    from ..conversion.mla import budget_shapes
    from ..kv import attention_sizes
    from ..patches.adapters import rotary_dim_of

    lay = attention_sizes(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return budget_shapes(2 * lay["kv_heads"] * lay["head_dim"], rotary_dim_of(text, lay["head_dim"]), saving)


@dataclass
class DemoOptions:
    out: str = "attnzoo-demo"  # created (with its parents) if missing
    model: str = "builtin"
    groups: int = 2
    fraction: float = 0.05  # uptraining budget, of the model's pretraining tokens
    lr: float = 1e-3
    alpha: float = 0.5
    temperature: float = 1.0
    batch_size: int = 8
    seq_len: int = 256
    eval_data: str = DEFAULT_EVAL_DATA
    eval_seqs: int = 128
    decode_tokens: int = 0  # decode speed is left out: noise on this model (docs/main-job.md); N > 0 measures it
    methods: tuple[str, ...] = ("mean", "svd")
    # uptraining runs: (name, start conversion, teacher?) — same budget each
    runs: tuple[tuple[str, str, bool], ...] = (("ce", "mean", False), ("distill", "mean", True),
                                               ("distill", "svd", True))
    keep_models: bool = False
    to: str = "gqa"  # or "mla": kv_rank/rope_dim (None: the -68.75% budget of the model's cache), mla_methods
    kv_rank: int | None = None
    rope_dim: int | None = None
    mla_methods: tuple[str, ...] = ("svd", "pca")
    mla_runs: tuple[tuple[str, str, bool], ...] = (("ce", "svd", False), ("distill", "svd", True),
                                                   ("distill", "pca", True))
    progress: bool = True
    log: list = field(default_factory=list)


def _say(opts: DemoOptions, text: str) -> None:
    opts.log.append(text)
    if opts.progress:
        print(text, flush=True)


def run_demo(opts: DemoOptions) -> dict:
    """Run the demo; writes :data:`OUTPUT_FILES` into ``opts.out`` and returns the results dict."""
    from ..uptrain import UptrainOptions, uptrain

    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out={opts.out!r}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    src = resolve_model_dir(opts.model, "--model")
    work = Path(tempfile.mkdtemp(prefix="attnzoo-demo-"))
    results: list[dict] = []
    curves: dict[str, list[dict]] = {}
    tokenizer = load_tokenizer(src)
    try:
        original = load_causal_lm(src, dtype=torch.float32)
        data = open_data(opts.eval_data, opts.seq_len, tokenizer=tokenizer,
                         vocab_size=original.config.get_text_config().vocab_size, option="--eval-data")

        def record(name: str, model, start: str | None = None, **extra) -> dict:
            e = evaluate(model, data, num_sequences=opts.eval_seqs, decode_tokens=opts.decode_tokens, name=name)
            results.append({"name": name, "from": start, "eval": e.as_dict(), **extra})
            recall = "-" if e.recall_perplexity is None else f"{e.recall_perplexity:.1f}"
            _say(opts, f"  {name}: perplexity {e.perplexity:.3f}, recall perplexity {recall}, "
                       f"KV {e.kv_bytes_per_token} B/token")
            return results[-1]

        heads = original.config.num_attention_heads
        _say(opts, f"[1/4] original: {src} ({heads} query heads, {original.config.num_key_value_heads} KV heads)")
        record("original (MHA)", original)
        pre = (getattr(original.config, "attnzoo", None) or {}).get("pretraining_tokens")

        if opts.to == "mla":
            kv_rank, rope_dim = mla_shapes(original.config, 0.6875)
            kv_rank, rope_dim = opts.kv_rank or kv_rank, opts.rope_dim or rope_dim
            label, methods, runs = f"mla{kv_rank}+{rope_dim}", opts.mla_methods, opts.mla_runs
            _say(opts, f"[2/4] convert to MLA, latent {kv_rank} + rope {rope_dim}: {', '.join(methods)}")
        else:
            label, methods, runs = f"gqa{opts.groups}", opts.methods, opts.runs
            _say(opts, f"[2/4] convert to GQA with {opts.groups} KV heads: {', '.join(methods)}")
        converted = {}
        for method in methods:
            if opts.to == "mla":
                model = convert_mla(original, kv_rank, rope_dim, method)
            else:
                model = convert_gqa(original, opts.groups, method)
            path = work / f"{label}-{method}"
            with quiet_hf():
                model.save_pretrained(str(path))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(path))
            converted[method] = path
            record(f"{label}-{method}", model, method=method)
        del model

        _say(opts, f"[3/4] uptrain each with {100 * opts.fraction:g}% of the {pre or '?'} pretraining tokens")
        for kind, method, distill in runs:
            if method not in converted:
                continue
            name = f"{label}-{method} + {kind}"
            dst = work / name.replace(" + ", "+")
            res = uptrain(UptrainOptions(
                model=str(converted[method]), out=str(dst), data="builtin:0", fraction=opts.fraction,
                teacher=str(src) if distill else None, alpha=opts.alpha if distill else 0.5,
                temperature=opts.temperature, lr=opts.lr, batch_size=opts.batch_size, seq_len=opts.seq_len,
                seed=0, progress=opts.progress, cpu=True, extra_metadata={"demo_run": name}))
            curves[name] = res.log
            with quiet_hf():
                model = load_causal_lm(dst, dtype=torch.float32)
            record(name, model, start=f"{label}-{method}", tokens=res.tokens,
                   fraction_of_pretraining=res.fraction_of_pretraining, uptrain_seconds=res.seconds)

        _say(opts, "[4/4] report")
        summary = {"to": opts.to, "target": label, "groups": opts.groups, "fraction": opts.fraction, "pretraining_tokens": pre,
                   "eval_data": opts.eval_data, "eval_sequences": opts.eval_seqs, "lr": opts.lr, "alpha": opts.alpha,
                   "temperature": opts.temperature, "seconds": None, "results": results}
        summary["seconds"] = round(time.perf_counter() - t_start, 1)
        _write(out, summary, curves)
        if opts.keep_models:
            kept = out / "demo_models"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(work, kept)
            summary["models"] = str(kept)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(out: Path, summary: dict, curves: dict) -> None:
    """Write the three output files, each through a temporary name renamed at the end."""
    files = {
        "demo_results.json": lambda p: p.write_text(json.dumps(summary, indent=1) + "\n"),
        "demo_table.md": lambda p: p.write_text(report.markdown(summary["results"]) + "\n"),
        "demo.png": lambda p: report.plot(summary["results"], curves, p),
    }
    for name, write in files.items():
        tmp = out / f".{name}.tmp"
        write(tmp) if name != "demo.png" else write(tmp.with_suffix(".tmp.png"))
        (tmp if name != "demo.png" else tmp.with_suffix(".tmp.png")).replace(out / name)
