"""``attnzoo data prepare``: tokenize text (or draw the built-in corpus) once into a token-id file.

The GPU host of a training run needs no tokenizer work and no corpus generation in its loop: it reads the
file memory-mapped (:mod:`attnzoo.data.token_file`). Each input file is one document (UTF-8 text,
tokenized without special tokens, EOS appended; a ``.safetensors`` file's ``input_ids`` or a ``.ids`` file's
integers are taken as they are, EOS appended); a directory contributes every file under it, sorted by
path. ``builtin[:SEED]`` writes the built-in corpus's sequences ``0, 1, ...`` (``--seq-len`` each, up to
``--tokens``).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .token_file import TokenFileWriter, tokenizer_fingerprint

__all__ = ["prepare_token_file", "input_files"]


def input_files(inputs: list[str], option: str = "INPUT") -> list[Path]:
    """The files the inputs name (directories expanded, sorted); missing paths raise naming them."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{option}={spec!r}: no such file or directory (expected text files, "
                                    "directories of them, or 'builtin[:SEED]')")
    return files


def _text_documents(files: list[Path], tokenizer, progress: bool) -> Iterator[tuple[str, list[int]]]:
    from tqdm.auto import tqdm

    from .sources import _read_file

    for f in tqdm(files, desc="tokenize", unit="file", disable=not progress):
        if f.suffix in (".safetensors", ".ids"):  # token ids already
            yield str(f), _read_file(f, "INPUT", str(f), None)[0].tolist()
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not a UTF-8 text file ({e}); pass text files only") from None
        yield str(f), tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _builtin_documents(seed: int, tokens: int, seq_len: int, progress: bool) -> Iterator[tuple[str, list[int]]]:
    from tqdm.auto import tqdm

    from .corpus import generate_sequence

    n = -(-tokens // seq_len)
    for i in tqdm(range(n), desc="builtin corpus", unit="seq", disable=not progress):
        yield f"builtin:{seed}", generate_sequence(seed, i, seq_len).tolist()


def prepare_token_file(inputs: list[str], out: str | Path, *, tokenizer=None, tokenizer_name: str | None = None,
                       tokens: int | None = None, seq_len: int = 256, progress: bool = True) -> dict:
    """Write the token file ``out`` from ``inputs`` (text files/directories, or one ``builtin[:SEED]``);
    returns its sidecar. ``tokens`` caps the count (the built-in corpus needs it). Text needs ``tokenizer``
    (a HF tokenizer); the built-in corpus uses the built-in vocabulary."""
    from . import vocab as V
    from .sources import _parse_builtin

    builtin = [s for s in inputs if s == "builtin" or s.startswith("builtin:")]
    if builtin:
        if len(inputs) != 1:
            raise ValueError(f"INPUT={builtin[0]!r}: the built-in corpus cannot be mixed with files; prepare it alone")
        if tokens is None:
            raise ValueError(f"INPUT={builtin[0]!r}: the built-in corpus is endless; give --tokens N")
        from .tokenizer import builtin_tokenizer

        docs = _builtin_documents(_parse_builtin(builtin[0], "INPUT"), tokens, seq_len, progress)
        writer = TokenFileWriter(out, vocab_size=V.VOCAB_SIZE, eos_id=None, tokenizer="builtin",
                                 tokenizer_sha256=tokenizer_fingerprint(builtin_tokenizer()))
    else:
        files = input_files(inputs)
        if tokenizer is None:
            raise ValueError("--tokenizer is needed to tokenize text or to record the vocabulary of token ids (a "
                             "model directory holding tokenizer.json)")
        docs = _text_documents(files, tokenizer, progress)
        writer = TokenFileWriter(out, vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id,
                                 tokenizer=tokenizer_name, tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    with writer:
        for source, ids in docs:
            if tokens is not None:
                room = tokens - writer.meta["count"] - (writer.meta["eos_id"] is not None)
                if room <= 0:
                    break
                ids = ids[:room]
            writer.add(ids, source)
    return writer.meta
