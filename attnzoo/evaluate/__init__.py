"""Evaluation of causal LMs: perplexity, recall, KV-cache bytes per token, decode speed.

``evaluate(model, data)`` on a loaded model, ``evaluate_dir("DIR", "builtin:1")`` on a directory;
``attnzoo eval`` is the CLI. Metric definitions: :mod:`attnzoo.evaluate.metrics` and docs/main-job.md.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..errors import check_positive_int
from ..kv import kv_bytes_per_token, kv_cache_bytes
from .metrics import Scores, score
from .speed import DecodeSpeed, decode_speed, decode_tokens_per_second

__all__ = ["EvalResult", "evaluate", "evaluate_dir", "score", "decode_speed", "decode_tokens_per_second", "DecodeSpeed",
           "DEFAULT_EVAL_DATA"]

DEFAULT_EVAL_DATA = "builtin:1"  # held out: the built-in model trained on builtin:0


@dataclass
class EvalResult:
    model: str
    data: str
    sequences: int
    tokens: int
    perplexity: float
    recall_perplexity: float | None
    recall_accuracy: float | None
    answers: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    kv_seq_len: int
    kv_dtype: str
    decode_tokens_per_s: float | None  # median of the timed runs
    parameters: int
    seconds: float
    decode_range: tuple[float, float] | None = None  # slowest and fastest timed run, tokens/s
    decode_threads: int | None = None  # torch intra-op threads while timing

    def as_dict(self) -> dict:
        return asdict(self)

    def row(self) -> dict:
        return {"model": self.model, "perplexity": self.perplexity, "recall ppl": self.recall_perplexity,
                "recall acc": self.recall_accuracy, "KV B/token": self.kv_bytes_per_token,
                "decode tok/s": self.decode_tokens_per_s, "params": self.parameters}


def evaluate(model, data, *, num_sequences: int | None = 128, batch_size: int = 16, decode_tokens: int = 64,
             decode_repeats: int = 5, name: str = "model", progress: bool = False) -> EvalResult:
    """Every metric of ``model`` on ``data`` (a :class:`~attnzoo.data.sources.TokenData`).

    ``num_sequences``: how many sequences to score (None: all of a file; required for the
    endless built-in corpus). ``decode_tokens=0`` skips the speed measurement; otherwise it is the
    median of ``decode_repeats`` timed runs (:func:`~attnzoo.evaluate.speed.decode_speed`).
    """

    n = num_sequences if data.num_sequences is None else min(num_sequences or data.num_sequences,
                                                              data.num_sequences)
    check_positive_int("--num-seqs", n)
    check_positive_int("--batch-size", batch_size)
    check_positive_int("--decode-tokens", decode_tokens, minimum=0)
    check_positive_int("--decode-repeats", decode_repeats)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        s: Scores = score(model, data, n, batch_size, progress=progress)
        speed = None
        if decode_tokens:
            prompt = data.batch([0])[:, : max(1, min(32, data.seq_len // 2))]  # the same prompt for every model
            speed = decode_speed(model, prompt, decode_tokens, repeats=decode_repeats)
    finally:
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    return EvalResult(name, data.name, n, s.tokens, s.perplexity, s.recall_perplexity, s.recall_accuracy,
                      s.answers, kv_bytes_per_token(model, dtype=dtype),
                      kv_cache_bytes(model, seq_len=data.seq_len, dtype=dtype), data.seq_len,
                      str(dtype).replace("torch.", ""),
                      speed.median if speed else None, sum(p.numel() for p in model.parameters()),
                      time.perf_counter() - t0, (speed.low, speed.high) if speed else None,
                      speed.threads if speed else None)


def evaluate_dir(model_dir: str, data: str = DEFAULT_EVAL_DATA, *, seq_len: int = 256, device: str | None = None,
                 dtype: torch.dtype | None = None, name: str | None = None, **kwargs) -> EvalResult:
    """Load ``model_dir`` (``"builtin"`` for the packaged model) and :func:`evaluate` it on ``data``."""
    from ..checkpoint_io import load_causal_lm, resolve_model_dir
    from ..data.sources import open_data
    from ..data.tokenizer import load_tokenizer

    path = resolve_model_dir(model_dir, "--model")
    model = load_causal_lm(path, dtype=dtype)
    if device:
        model.to(device)
    tokenizer = load_tokenizer(path)
    vocab = model.config.get_text_config().vocab_size
    tdata = open_data(data, seq_len, tokenizer=tokenizer, vocab_size=vocab)
    return evaluate(model, tdata, name=name or str(model_dir), **kwargs)
