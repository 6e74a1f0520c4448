"""Evaluate a causal LM: perplexity (all tokens and recall answers), recall accuracy, KV-cache
bytes per token and greedy decode tokens/s.

    attnzoo eval --model builtin
    attnzoo eval --model converted/ --data builtin:1 --json metrics.json
    attnzoo eval --model some-hf-model/ --data corpus.txt --num-seqs 0

--data is 'builtin[:SEED]' (the built-in corpus; seed 1 is held out from the built-in model's
training), a .safetensors or .ids file of token ids, or a text file (tokenized with the model's
tokenizer). Recall metrics need answer positions (built-in corpus format); elsewhere they show
'-'. Works on any causal LM directory: plain Hugging Face or written by attnzoo.
"""
from __future__ import annotations

import json
from pathlib import Path

NAME = "eval"
HELP = "perplexity, recall accuracy, KV bytes/token and decode speed of a model"

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p):
    from ..evaluate import DEFAULT_EVAL_DATA

    p.add_argument("--model", required=True, help="model directory, or 'builtin' for the packaged model")
    p.add_argument("--data", default=DEFAULT_EVAL_DATA, help="'builtin[:SEED]', a .safetensors/.ids file of token "
                   "ids, or a text file (default: %(default)s)")
    p.add_argument("--num-seqs", type=int, default=128, help="sequences to score; 0 = all of a file "
                   "(default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens timed for decode speed; 0 = skip "
                   "(default: %(default)s)")
    p.add_argument("--decode-repeats", type=int, default=5, help="timed decode runs; the median is reported "
                   "with the slowest and fastest (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch intra-op threads for the run (default: torch's choice; "
                   "fix it to compare decode speeds)")
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when present, else cpu)")
    p.add_argument("--dtype", choices=_DTYPES, help="load the weights in this dtype (default: as stored)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON to FILE ('-' = stdout)")


def _speed(result, repeats: int) -> str | None:
    if result.decode_tokens_per_s is None:
        return None
    lo, hi = result.decode_range
    return (f"{result.decode_tokens_per_s:.1f} (median of {repeats} runs: {lo:.1f} to {hi:.1f}; "
            f"{result.decode_threads} thread{'s' if result.decode_threads != 1 else ''})")


def _check_json_target(path: Path) -> None:
    import os

    if path.is_dir():
        raise IsADirectoryError(f"--json={str(path)!r}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--json={str(path)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"--json={str(path)!r}: not writable (permission denied)")


def run(args) -> int:
    import torch

    from ..errors import check_positive_int
    from ..evaluate import evaluate_dir
    from ..table import format_table

    check_positive_int("--num-seqs", args.num_seqs, minimum=0)
    check_positive_int("--seq-len", args.seq_len, minimum=2)
    check_positive_int("--threads", args.threads, allow_none=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.json and args.json != "-":  # before the evaluation, not after it
        _check_json_target(Path(args.json))
    if args.num_seqs == 0 and (args.data == "builtin" or args.data.startswith("builtin:")):
        raise ValueError(f"--num-seqs=0 means 'all of a file', but --data={args.data!r} is endless; give a count")
    result = evaluate_dir(args.model, args.data, seq_len=args.seq_len, device=device,
                          dtype=getattr(torch, args.dtype) if args.dtype else None, num_sequences=args.num_seqs or None,
                          batch_size=args.batch_size, decode_tokens=args.decode_tokens,
                          decode_repeats=args.decode_repeats, progress=True)
    d = result.as_dict()
    if args.json:
        text = json.dumps(d, indent=1)
        if args.json == "-":
            print(text)
            return 0
        try:
            Path(args.json).write_text(text + "\n")
        except OSError as e:
            if e.filename is None:  # a full disk names no file
                e.filename = args.json
            raise
    rows = [{"metric": "perplexity (all tokens)", "value": result.perplexity},
            {"metric": "recall perplexity (answer tokens)", "value": result.recall_perplexity},
            {"metric": "recall accuracy (top-1)", "value": result.recall_accuracy},
            {"metric": f"KV-cache bytes/token ({result.kv_dtype})", "value": result.kv_bytes_per_token},
            {"metric": f"KV cache held at {result.kv_seq_len} tokens (batch 1)", "value": result.kv_cache_bytes},
            {"metric": f"decode tokens/s ({device}, batch 1)", "value": _speed(result, args.decode_repeats)},
            {"metric": "parameters", "value": result.parameters},
            {"metric": "scored", "value": f"{result.sequences} seqs, {result.tokens:,} tokens, "
                                           f"{result.answers} answers"}]
    print(format_table(rows, title=f"eval: {args.model} on {args.data}"))
    return 0
