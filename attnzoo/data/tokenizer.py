"""The built-in corpus's tokenizer: word level over :mod:`attnzoo.data.vocab`, as a HF fast tokenizer.

``builtin_tokenizer()`` returns a ``transformers`` ``PreTrainedTokenizerFast`` (one id per
whitespace-separated word, unknown words -> ``<unk>``). ``tok.save_pretrained(dir)`` writes
``tokenizer.json`` + ``tokenizer_config.json``; ``AutoTokenizer.from_pretrained(dir)`` (or
:func:`load_tokenizer`) reads them back, with no attnzoo code needed.
"""
from __future__ import annotations

from pathlib import Path

from . import vocab as V

__all__ = ["builtin_tokenizer", "load_tokenizer"]


def builtin_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(V.TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=4096, clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory (any HF tokenizer), or None when it holds none."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except OSError:
        raise  # names its file
    except Exception as e:  # invalid tokenizer.json (json, tokenizers' own Exception), missing keys...
        text = " ".join(str(e).split())[:300]
        raise ValueError(f"{path}: its tokenizer files (tokenizer.json, tokenizer_config.json) cannot be loaded "
                         f"({type(e).__name__}: {text})") from e
