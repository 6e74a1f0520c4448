"""Prepare training data: `attnzoo data prepare` tokenizes text once into a memory-mapped token-id file.

    attnzoo data prepare docs/ more.txt --tokenizer model_dir/ --out train.tokens
    attnzoo data prepare builtin:0 --tokens 20000000 --out builtin.tokens
    attnzoo uptrain --model converted/ --data train.tokens ...

The file (ids as uint16 when the vocabulary has fewer than 65,536 tokens, else int32) and its sidecar
train.tokens.json (tokenizer, vocabulary fingerprint, counts) are what `uptrain --data` and `eval --data`
read: documents packed with EOS between them, cut into --seq-len windows at training time, visited in a
seeded order. See docs/uptrain.md.
"""
from __future__ import annotations

from pathlib import Path

NAME = "data"
HELP = "prepare a token-id file for uptrain/eval (tokenize once, memory-mapped)"


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pr = sub.add_parser("prepare", help="tokenize text files (or the built-in corpus) into a token file",
                        description=__doc__)
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="text files or directories (each file is one "
                    "document), or 'builtin[:SEED]'")
    pr.add_argument("--out", required=True, help="the token file to write (its sidecar is OUT.json)")
    pr.add_argument("--tokenizer", help="model directory whose tokenizer to use (needed for text; 'builtin' "
                    "for the built-in model)")
    pr.add_argument("--tokens", type=int, help="stop after this many tokens (needed for builtin)")
    pr.add_argument("--seq-len", type=int, default=256, help="sequence length of the built-in corpus's "
                    "sequences (default: %(default)s)")
    pr.add_argument("--force", action="store_true", help="replace an existing --out")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..checkpoint_io import resolve_model_dir
    from ..data.prepare import prepare_token_file
    from ..data.tokenizer import load_tokenizer
    from ..errors import check_positive_int
    from ..table import format_table

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"--out={args.out!r} already exists; pass --force to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"--out={args.out!r}: is a directory; give a file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out={args.out!r}: the directory {str(out.parent)!r} does not exist")
    if args.tokens is not None:
        check_positive_int("--tokens", args.tokens)
    check_positive_int("--seq-len", args.seq_len, minimum=2)
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(resolve_model_dir(args.tokenizer, "--tokenizer"))
        if tokenizer is None:
            raise ValueError(f"--tokenizer={args.tokenizer!r}: the directory holds no tokenizer (tokenizer.json)")
    meta = prepare_token_file(args.inputs, out, tokenizer=tokenizer, tokenizer_name=args.tokenizer,
                              tokens=args.tokens, seq_len=args.seq_len, progress=not args.no_progress)
    rows = [("tokens", f"{meta['count']:,}"), ("documents", f"{meta['documents']:,}"),
            ("dtype", meta["dtype"]), ("vocab size", f"{meta['vocab_size']:,}"),
            ("tokenizer", str(meta["tokenizer"])), ("file", f"{out} (+ {out.name}.json)")]
    print(format_table([{"": k, "value": v} for k, v in rows], title="data prepare"))
    return 0
