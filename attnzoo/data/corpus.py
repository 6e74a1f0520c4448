"""The built-in corpus: a seeded generator of a small language plus associative-recall episodes.

Every sequence is a pure function of ``(seed, index, seq_len)``, so a corpus is
reproducible, randomly addressable (a training run resumes at a sample index) and
needs no stored text. A sequence mixes two things:

* **Grammar text**: sentences from a small probabilistic grammar over the word classes of
  :mod:`attnzoo.data.vocab` with Zipfian word frequencies, subject-verb number agreement,
  and verbs/adjectives that prefer nouns of one semantic cluster. Learnable, not trivial.
* **Recall episodes** in the style of MQAR: ``<kv> K12 V03 K40 V33 ...`` binds keys to
  random values; a few sentences later ``<q> K40 V33 K12 V03 ...`` asks for the keys again
  in a new order. The value after a queried key (an *answer token*) can only be predicted
  by attending back to the binding, so it measures the quality of attention.

:func:`answer_mask` recovers the answer positions from token ids alone, so any token file
written in this format (e.g. by ``python -m attnzoo.data.corpus``) gets recall metrics too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import check_positive_int, check_type
from . import vocab as V

__all__ = ["BuiltinCorpus", "generate_sequence", "answer_mask", "DEFAULT_SEQ_LEN"]

DEFAULT_SEQ_LEN = 256
_ZIPF_S = 1.1
_CLUSTERS = 8  # semantic noun clusters: noun i is in cluster i % 8


def _zipf_cdf(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** _ZIPF_S
    return np.cumsum(w / w.sum())


_CDF = {name: _zipf_cdf(len(ids)) for name, ids in V.CLASS_IDS.items()}
_IDS = {name: np.asarray(ids) for name, ids in V.CLASS_IDS.items()}
_CLUSTER_CDF = _zipf_cdf(V.CLASS_SIZES["noun_sg"] // _CLUSTERS)


class _Writer:
    """Draws sentences into a token list with one numpy Generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.out: list[int] = [V.BOS]

    def word(self, cls: str) -> int:
        i = int(np.searchsorted(_CDF[cls], self.rng.random()))
        self.out.append(int(_IDS[cls][min(i, len(_IDS[cls]) - 1)]))
        return i

    def noun(self, num: str, cluster: int | None) -> None:
        if cluster is None or self.rng.random() < 0.3:
            self.word("noun_" + num)
            return
        j = min(int(np.searchsorted(_CLUSTER_CDF, self.rng.random())), len(_CLUSTER_CDF) - 1)
        self.out.append(int(_IDS["noun_" + num][j * _CLUSTERS + cluster]))

    def noun_phrase(self, num: str, cluster: int | None = None, pp: bool = True) -> None:
        self.word("det_" + num)
        for _ in range(2):
            if self.rng.random() >= 0.35:
                break
            cluster = self.word("adj") % _CLUSTERS
        self.noun(num, cluster)
        if pp and self.rng.random() < 0.2:
            self.word("prep")
            self.noun_phrase(self._num(), pp=False)

    def _num(self) -> str:
        return "sg" if self.rng.random() < 0.6 else "pl"

    def clause(self) -> None:
        num = self._num()
        self.noun_phrase(num)
        verb = self.word("verb_" + num)
        if self.rng.random() < 0.6:
            self.noun_phrase(self._num(), cluster=verb % _CLUSTERS)
        if self.rng.random() < 0.3:
            self.word("adv")

    def sentence(self) -> None:
        self.clause()
        if self.rng.random() < 0.15:
            self.out.append(V.COMMA)
            self.word("conj")
            self.clause()
        self.out.append(V.PERIOD)

    def sentences(self, n: int) -> None:
        for _ in range(n):
            self.sentence()

    def episode(self, keys: np.ndarray) -> None:
        values = self.rng.integers(0, V.NUM_VALUES, size=len(keys))
        self.out.append(V.KV)
        for k, v in zip(keys, values):
            self.out += [V.KEY_IDS[k], V.VALUE_IDS[v]]
        self.sentences(int(self.rng.integers(1, 3)))  # the gap the model must bridge
        self.out.append(V.Q)
        for i in self.rng.permutation(len(keys)):
            self.out += [V.KEY_IDS[keys[i]], V.VALUE_IDS[values[i]]]


def generate_sequence(seed: int, index: int, seq_len: int = DEFAULT_SEQ_LEN) -> np.ndarray:
    """Token ids (int64, length ``seq_len``) of sequence ``index`` of the corpus ``seed``."""
    w = _Writer(np.random.default_rng([seed, index]))
    n_episodes = int(w.rng.integers(2, 5)) if seq_len >= 128 else 1
    sizes = w.rng.integers(4, 11, size=n_episodes)
    keys = w.rng.permutation(V.NUM_KEYS)[: int(sizes.sum())]  # keys are unique within a sequence
    start = 0
    for n in sizes:
        w.sentences(int(w.rng.integers(0, 2)))
        w.episode(keys[start:start + n])
        start += n
    while len(w.out) < seq_len:
        w.sentence()
    return np.asarray(w.out[:seq_len], dtype=np.int64)


def answer_mask(ids) -> torch.Tensor:
    """Bool mask, True at *answer tokens*: a value that follows a key inside a ``<q>`` block.

    Works on a 1-D or 2-D tensor/array of ids in the built-in vocabulary. Position ``t`` is
    an answer when ``ids[t]`` is a value, ``ids[t-1]`` a key, and the run of keys/values
    containing them starts right after ``<q>``.
    """
    ids = torch.as_tensor(ids)
    flat = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.unsqueeze(0)
    out = torch.zeros_like(flat, dtype=torch.bool)
    is_key = (flat >= V.KEY_IDS.start) & (flat < V.KEY_IDS.stop)
    is_val = (flat >= V.VALUE_IDS.start) & (flat < V.VALUE_IDS.stop)
    for r in range(flat.shape[0]):
        in_query = False
        row_k, row_v, row = is_key[r].tolist(), is_val[r].tolist(), flat[r].tolist()
        for t, tok in enumerate(row):
            if tok == V.Q:
                in_query = True
            elif not (row_k[t] or row_v[t]):
                in_query = False
            elif in_query and row_v[t] and t > 0 and row_k[t - 1]:
                out[r, t] = True
    return out.reshape(ids.shape)


@dataclass(frozen=True)
class BuiltinCorpus:
    """The built-in corpus for one ``seed``: an endless, randomly addressable list of sequences.

    ``corpus[i]`` is sequence ``i`` (a ``LongTensor`` of ``seq_len`` ids); ``corpus.batch(range(8))``
    stacks several. Train on one seed and evaluate on another (the CLI's ``builtin:SEED``).
    """

    seed: int = 0
    seq_len: int = DEFAULT_SEQ_LEN

    def __post_init__(self):
        check_type("seed", self.seed, int, "a non-negative integer")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: expected a non-negative integer")
        check_positive_int("seq_len", self.seq_len, minimum=8)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            raise IndexError(f"index={index}: the built-in corpus is endless; use indices >= 0")
        return torch.from_numpy(generate_sequence(self.seed, index, self.seq_len))

    def batch(self, indices) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices])

    def text(self, index: int) -> str:
        return " ".join(V.TOKENS[i] for i in self[index].tolist())
