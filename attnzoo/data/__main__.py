"""Write sequences of the built-in corpus to a file: ``python -m attnzoo.data --seed 1 --sequences 64 --out f.ids``.

``.ids``: whitespace-separated token ids, one sequence per line; ``.safetensors``: tensors
``input_ids`` and ``answer_mask`` ``[n, seq_len]``; anything else: the text, one sequence per line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from .corpus import DEFAULT_SEQ_LEN, BuiltinCorpus, answer_mask
    from .vocab import TOKENS

    p = argparse.ArgumentParser(prog="python -m attnzoo.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    args = p.parse_args(argv)
    corpus = BuiltinCorpus(args.seed, args.seq_len)
    ids = corpus.batch(range(args.sequences))
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"input_ids": ids, "answer_mask": answer_mask(ids).to(ids.dtype)}, str(tmp))
    elif out.suffix == ".ids":
        tmp.write_text("".join(" ".join(map(str, row)) + "\n" for row in ids.tolist()))
    else:
        tmp.write_text("".join(" ".join(TOKENS[i] for i in row) + "\n" for row in ids.tolist()))
    tmp.replace(out)
    print(f"wrote {args.sequences} sequences of builtin:{args.seed} ({ids.numel():,} tokens) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
