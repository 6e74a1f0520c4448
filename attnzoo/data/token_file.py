"""Token-id files: text tokenized once on the CPU, read memory-mapped by training (``attnzoo data prepare``).

A token file is two files side by side:

* ``NAME.tokens``: the ids of every document, concatenated (packed) with the tokenizer's EOS id after each
  document, as raw little-endian ``uint16`` when the vocabulary has fewer than 65,536 tokens, else ``int32``.
  No header: ``numpy.memmap(NAME.tokens, dtype)`` reads it.
* ``NAME.tokens.json`` (the sidecar): ``format`` (``"attnzoo-tokens"``), ``version``, ``dtype``, ``count``
  (tokens), ``documents``, ``vocab_size``, ``max_id``, ``eos_id``, ``tokenizer`` (where it came from) and
  ``tokenizer_sha256`` (a fingerprint of its vocabulary, checked against the model's by ``uptrain``), the
  ``sources`` and when it was written. The sidecar is written last: a file without one is not a token file.

Training cuts the stream into non-overlapping windows of ``seq_len`` tokens (sequence packing: documents
follow each other inside a window, separated by EOS, as in GPT-style pretraining; nothing is padded) and
visits them in an order that is a pure function of ``(seed, epoch)`` (:class:`WindowOrder`), so the batch of
any step can be recomputed, which is what makes ``--resume`` exact. Reading a batch is a slice of the
memory map: no per-step generation or tokenization, and the file is paged in by the OS, not held in RAM.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["TOKEN_FORMAT", "sidecar_path", "is_token_file", "TokenFileWriter", "TokenFile", "open_token_file",
           "WindowOrder", "tokenizer_fingerprint", "token_dtype"]

TOKEN_FORMAT = "attnzoo-tokens"
_VERSION = 1


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def is_token_file(path: str | Path) -> bool:
    """True when ``path`` has a sidecar naming the token-file format."""
    side = sidecar_path(path)
    if not side.is_file():
        return False
    try:
        return json.loads(side.read_text()).get("format") == TOKEN_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab < 65,536), else ``int32``."""
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<i4")


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of the tokenizer's vocabulary (token -> id), or None without a tokenizer."""
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


class TokenFileWriter:
    """Append documents (id sequences) to a new token file; :meth:`close` publishes it.

    ``with TokenFileWriter(out, vocab_size=..., eos_id=...) as w: w.add(ids)``. The data goes to a
    temporary file beside ``out``; on success it is renamed into place and the sidecar written, on an
    error both are removed and an existing ``out`` is left as it was.
    """

    def __init__(self, out: str | Path, *, vocab_size: int, eos_id: int | None, tokenizer: str | None = None,
                 tokenizer_sha256: str | None = None):
        self.out = Path(out)
        self.dtype = token_dtype(vocab_size)
        self.meta = {"format": TOKEN_FORMAT, "version": _VERSION, "dtype": self.dtype.name, "count": 0,
                     "documents": 0, "vocab_size": int(vocab_size), "max_id": -1, "eos_id": eos_id,
                     "tokenizer": tokenizer, "tokenizer_sha256": tokenizer_sha256, "sources": []}
        self._tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self._f = open(self._tmp, "wb")

    def add(self, ids, source: str | None = None) -> int:
        """Append one document (ids, then EOS when the tokenizer has one); returns its token count."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.meta["eos_id"] is not None:
            arr = np.append(arr, self.meta["eos_id"])
        if arr.size == 0:
            return 0
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.meta["vocab_size"]:
            raise ValueError(f"token ids range over [{lo}, {hi}] but the vocabulary has {self.meta['vocab_size']} "
                             f"tokens ({source or 'a document'})")
        self._f.write(arr.astype(self.dtype).tobytes())
        self.meta["count"] += int(arr.size)
        self.meta["documents"] += 1
        self.meta["max_id"] = max(self.meta["max_id"], hi)
        if source is not None and (not self.meta["sources"] or self.meta["sources"][-1] != source):
            self.meta["sources"].append(source)
        return int(arr.size)

    def close(self) -> dict:
        self._f.close()
        self.meta["written"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        side, side_tmp = sidecar_path(self.out), sidecar_path(self._tmp)
        side_tmp.write_text(json.dumps(self.meta, indent=1) + "\n")
        side.unlink(missing_ok=True)  # no sidecar while the data is swapped: never a half-new pair
        os.replace(self._tmp, self.out)
        os.replace(side_tmp, side)
        return self.meta

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)
        sidecar_path(self._tmp).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


@dataclass
class TokenFile:
    """An open token file: ``ids`` is the memory-mapped stream (numpy, read-only), ``meta`` the sidecar."""

    path: Path
    ids: np.ndarray
    meta: dict

    def windows(self, seq_len: int) -> int:
        return len(self.ids) // seq_len

    def window(self, j: int, seq_len: int) -> np.ndarray:
        return self.ids[j * seq_len:(j + 1) * seq_len]


def open_token_file(path: str | Path, option: str = "--data") -> TokenFile:
    path = Path(path)
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{option}={str(path)!r}: its sidecar {side.name} is not valid JSON ({e})") from e
    if meta.get("format") != TOKEN_FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"{option}={str(path)!r}: {side.name} is not an {TOKEN_FORMAT} version {_VERSION} sidecar "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    size = path.stat().st_size
    if size != meta["count"] * dtype.itemsize:
        raise ValueError(f"{option}={str(path)!r}: the file has {size} bytes but its sidecar records "
                         f"{meta['count']} {meta['dtype']} tokens ({meta['count'] * dtype.itemsize} bytes); "
                         "prepare it again")
    ids = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return TokenFile(path, ids, meta)


class WindowOrder:
    """The order in which training visits ``n`` windows: a permutation per epoch, a pure function of
    ``(seed, epoch)``; index ``i`` of the endless sequence is window ``perm(seed, i // n)[i % n]``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return int(self._perm[j])


def prepare_documents(docs: Iterable[tuple[str, list[int]]], out: str | Path, **writer_kwargs) -> dict:
    """Write ``(source, ids)`` documents to the token file ``out``; returns the sidecar."""
    with TokenFileWriter(out, **writer_kwargs) as w:
        for source, ids in docs:
            w.add(ids, source)
    return w.meta
