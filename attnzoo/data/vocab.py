"""The built-in corpus's fixed vocabulary (512 tokens): specials, recall keys/values, grammar words.

The vocabulary does not depend on any corpus seed: word strings are pseudo-words made
from syllables by a fixed rule, so every checkpoint trained on the built-in corpus
shares one token table.

Layout (ids): ``0..7`` specials, ``8..71`` keys ``K00..K63``, ``72..135`` values
``V00..V63``, ``136..511`` grammar words grouped by class (see :data:`CLASS_SIZES`).
"""
from __future__ import annotations

import itertools

__all__ = ["SPECIALS", "PAD", "BOS", "EOS", "UNK", "PERIOD", "COMMA", "KV", "Q", "NUM_KEYS", "NUM_VALUES",
           "KEY_IDS", "VALUE_IDS", "CLASS_SIZES", "CLASS_IDS", "TOKENS", "VOCAB_SIZE", "token_to_id"]

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", ".", ",", "<kv>", "<q>"]
PAD, BOS, EOS, UNK, PERIOD, COMMA, KV, Q = range(len(SPECIALS))
NUM_KEYS = 64
NUM_VALUES = 64

# grammar word classes and how many words each holds (sums to 376 = 512 - 8 - 64 - 64)
CLASS_SIZES = {
    "det_sg": 4, "det_pl": 4, "prep": 12, "conj": 4, "adv": 24, "adj": 56,
    "noun_sg": 80, "noun_pl": 80, "verb_sg": 56, "verb_pl": 56,
}

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()


def _pseudo_words(n: int) -> list[str]:
    sylls = [c + v for c, v in itertools.product(_ONSETS, _VOWELS)]  # 70 syllables
    pairs = [a + b for a, b in itertools.product(sylls, sylls)]  # 4900 two-syllable roots
    roots = [pairs[(i * 1237) % len(pairs)] for i in range(len(pairs))]  # fixed scramble (1237 is coprime to 4900)
    seen, out = set(), []
    for r in roots:
        if r not in seen:
            seen.add(r)
            out.append(r)
        if len(out) == n:
            return out
    raise RuntimeError("not enough pseudo-words")  # pragma: no cover (fixed sizes)


def _build():
    tokens = list(SPECIALS)
    tokens += [f"K{i:02d}" for i in range(NUM_KEYS)]
    tokens += [f"V{i:02d}" for i in range(NUM_VALUES)]
    n_roots = sum(v for k, v in CLASS_SIZES.items() if not k.endswith("_pl"))
    roots = iter(_pseudo_words(n_roots))
    class_ids: dict[str, list[int]] = {}
    for name, size in CLASS_SIZES.items():
        if name.endswith("_pl"):  # plural forms share the singular's roots: noun -> nouns, verb -> verben
            sg = name[:-3] + "_sg"
            suffix = "s" if name.startswith("noun") else "n"
            words = [tokens[i] + suffix for i in class_ids[sg]]
        else:
            words = [next(roots) for _ in range(size)]
        class_ids[name] = list(range(len(tokens), len(tokens) + size))
        tokens += words
    return tokens, class_ids


TOKENS, CLASS_IDS = _build()
VOCAB_SIZE = len(TOKENS)
KEY_IDS = range(len(SPECIALS), len(SPECIALS) + NUM_KEYS)
VALUE_IDS = range(KEY_IDS.stop, KEY_IDS.stop + NUM_VALUES)
_INDEX = {t: i for i, t in enumerate(TOKENS)}
if len(_INDEX) != VOCAB_SIZE or VOCAB_SIZE != 512:  # pragma: no cover (a broken edit of the tables above)
    raise RuntimeError(f"built-in vocabulary is inconsistent ({VOCAB_SIZE} tokens, {len(_INDEX)} distinct)")


def token_to_id(token: str) -> int:
    return _INDEX.get(token, UNK)
