"""``--data`` for eval and uptrain: the built-in corpus or a file, as fixed-length sequences.

Accepted values:

* ``builtin`` or ``builtin:SEED``: the built-in corpus (endless; seed 0 unless given).
* ``FILE.safetensors``: a tensor ``input_ids`` (1-D stream or 2-D rows) and optionally a
  bool/int tensor ``answer_mask`` of the same shape (True at answer tokens, for recall metrics).
* ``FILE.ids``: token ids as whitespace-separated integers.
* ``FILE.tokens`` (any name with a ``FILE.tokens.json`` sidecar): a token-id file from ``attnzoo data
  prepare``, memory-mapped (see :mod:`attnzoo.data.token_file`); with ``shuffle_seed`` its windows are
  visited in a seeded order per epoch (what ``uptrain`` uses).
* any other file: UTF-8 text, tokenized with the model's tokenizer.

Files are flattened to one stream and cut into ``seq_len`` pieces (the last partial piece is
dropped unless the file is shorter than one piece). Recall metrics need answer positions:
from the corpus, from a file's ``answer_mask``, or, when the tokenizer is the built-in one,
recovered from the ids by :func:`attnzoo.data.corpus.answer_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import vocab as V
from .corpus import BuiltinCorpus, answer_mask
from .token_file import TokenFile, WindowOrder, is_token_file, open_token_file, tokenizer_fingerprint

__all__ = ["TokenData", "open_data", "uses_builtin_vocab"]


@dataclass
class TokenData:
    """Sequences of token ids. ``num_sequences`` is None for the endless built-in corpus."""

    name: str
    seq_len: int
    num_sequences: int | None
    _corpus: BuiltinCorpus | None = None
    _ids: torch.Tensor | None = None  # [n, seq_len]
    _answers: torch.Tensor | None = None  # [n, seq_len] bool, or None: no recall metrics
    _builtin_vocab: bool = False
    _tokens: TokenFile | None = None  # a memory-mapped token file, cut into windows of seq_len
    _order: WindowOrder | None = None  # seeded window order (token files opened with shuffle_seed)

    @property
    def has_answers(self) -> bool:
        return self._corpus is not None or self._answers is not None or self._builtin_vocab

    def batch(self, indices) -> torch.Tensor:
        """Ids ``[len(indices), seq_len]``; indices past the end wrap (a new epoch, reshuffled by seed)."""
        if self._corpus is not None:
            return self._corpus.batch(indices)
        if self._tokens is not None:
            rows = [self._tokens.window(self._row(int(i)), self.seq_len) for i in indices]
            return torch.from_numpy(np.stack(rows).astype(np.int64))
        return self._ids[[self._row(int(i)) for i in indices]]

    def answers(self, indices, ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bool answer mask for the same rows as :meth:`batch`, or None when recall is not defined."""
        if self._answers is not None:
            return self._answers[[self._row(int(i)) for i in indices]]
        if self._corpus is not None or self._builtin_vocab:
            return answer_mask(self.batch(indices) if ids is None else ids)
        return None

    def _row(self, i: int) -> int:
        if self._order is not None:
            return self._order(i)
        n = self.num_sequences
        epoch, j = divmod(i, n)
        if epoch == 0:
            return j
        g = torch.Generator().manual_seed(epoch)
        return int(torch.randperm(n, generator=g)[j])


def uses_builtin_vocab(tokenizer) -> bool:
    if tokenizer is None:
        return False
    try:
        return tokenizer.get_vocab() == {t: i for i, t in enumerate(V.TOKENS)}
    except (AttributeError, NotImplementedError):
        return False


def _parse_builtin(spec: str, option: str) -> int:
    _, _, seed = spec.partition(":")
    if not seed:
        return 0
    if not seed.isdigit():
        raise ValueError(f"{option}={spec!r}: the seed after 'builtin:' must be a non-negative integer, "
                         f"e.g. 'builtin:1'")
    return int(seed)


def _read_file(path: Path, option: str, spec: str, tokenizer):
    answers = None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{option}={spec!r}: not a valid safetensors file ({e})") from None
        if "input_ids" not in tensors:
            raise ValueError(f"{option}={spec!r}: the safetensors file holds {sorted(tensors)}, "
                             "expected a tensor named 'input_ids'")
        ids = tensors["input_ids"].long().reshape(-1)
        if "answer_mask" in tensors:
            answers = tensors["answer_mask"].bool().reshape(-1)
            if answers.numel() != ids.numel():
                raise ValueError(f"{option}={spec!r}: answer_mask has {answers.numel()} entries but input_ids "
                                 f"has {ids.numel()}")
        return ids, answers
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{option}={spec!r}: not a UTF-8 text file ({e}); token ids go in a .safetensors or .ids "
                         "file") from None
    if path.suffix == ".ids":
        try:
            return torch.tensor([int(w) for w in text.split()], dtype=torch.long), None
        except ValueError as e:
            raise ValueError(f"{option}={spec!r}: a .ids file must hold whitespace-separated integers ({e})") from e
    if tokenizer is None:
        raise ValueError(f"{option}={spec!r} is a text file, but the model has no tokenizer to read it; "
                         "pass token ids instead (.ids or .safetensors) or use 'builtin'")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long), None


def open_data(spec: str, seq_len: int, *, tokenizer=None, vocab_size: int | None = None,
              num_sequences: int | None = None, option: str = "--data", shuffle_seed: int | None = None) -> TokenData:
    """Open ``spec`` (see the module doc) as sequences of ``seq_len`` tokens.

    ``num_sequences`` caps a file's sequences and sets how many the built-in corpus yields
    (None: endless). ``vocab_size`` checks that every id fits the model. ``shuffle_seed``: a token
    file's windows are visited in a seeded order (else in file order, reshuffled after the first epoch).
    """
    spec = str(spec)
    if spec == "builtin" or spec.startswith("builtin:"):
        if vocab_size is not None and vocab_size < V.VOCAB_SIZE:
            raise ValueError(f"{option}={spec!r}: the built-in corpus has {V.VOCAB_SIZE} token ids but the model's "
                             f"vocab_size is {vocab_size}; use a model built on the built-in vocabulary")
        corpus = BuiltinCorpus(_parse_builtin(spec, option), seq_len)
        return TokenData(spec, seq_len, num_sequences, _corpus=corpus)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{option}={spec!r}: no such file (expected 'builtin', 'builtin:SEED', "
                                "a .safetensors/.ids file of token ids, or a text file)")
    if is_token_file(path):
        return _open_token_file(path, spec, seq_len, tokenizer, vocab_size, num_sequences, option, shuffle_seed)
    ids, answers = _read_file(path, option, spec, tokenizer)
    if ids.numel() < 2:
        raise ValueError(f"{option}={spec!r}: the file holds {ids.numel()} token(s); at least 2 are needed")
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise ValueError(f"{option}={spec!r}: token ids range over [{int(ids.min())}, {int(ids.max())}] but the "
                         f"model's vocab_size is {vocab_size}")
    length = min(seq_len, ids.numel())
    n = ids.numel() // length
    if num_sequences is not None:
        n = min(n, num_sequences)
    rows = ids[: n * length].reshape(n, length)
    ans = answers[: n * length].reshape(n, length) if answers is not None else None
    return TokenData(spec, length, n, _ids=rows, _answers=ans, _builtin_vocab=uses_builtin_vocab(tokenizer))



def _open_token_file(path, spec, seq_len, tokenizer, vocab_size, num_sequences, option, shuffle_seed) -> TokenData:
    tf = open_token_file(path, option)
    meta = tf.meta
    if vocab_size is not None and meta["max_id"] >= vocab_size:
        raise ValueError(f"{option}={spec!r}: token ids reach {meta['max_id']} but the model's vocab_size is "
                         f"{vocab_size}; prepare the file with the model's tokenizer")
    theirs, ours = meta.get("tokenizer_sha256"), tokenizer_fingerprint(tokenizer)
    if theirs and ours and theirs != ours:
        raise ValueError(f"{option}={spec!r}: the file was tokenized with {meta.get('tokenizer')!r}, whose vocabulary "
                         "differs from the model's tokenizer; prepare it again with the model's tokenizer "
                         "(attnzoo data prepare --tokenizer MODEL_DIR)")
    if meta["count"] < 2:
        raise ValueError(f"{option}={spec!r}: the file holds {meta['count']} token(s); at least 2 are needed")
    length = min(seq_len, meta["count"])
    n = tf.windows(length)
    if num_sequences is not None:
        n = min(n, num_sequences)
    order = WindowOrder(n, shuffle_seed) if shuffle_seed is not None else None
    return TokenData(spec, length, n, _tokens=tf, _order=order, _builtin_vocab=uses_builtin_vocab(tokenizer))
