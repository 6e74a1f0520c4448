"""Built-in data: a seeded corpus (grammar text + associative recall), its tokenizer, the built-in model.

Nothing here downloads anything: the corpus is generated, the tokenizer is built from a fixed
vocabulary, and the model ships in the package (see :mod:`attnzoo.data.model`).
"""
from .corpus import DEFAULT_SEQ_LEN, BuiltinCorpus, answer_mask, generate_sequence
from .model import PRESETS, builtin_model_dir, init_model, model_config
from .sources import TokenData, open_data
from .tokenizer import builtin_tokenizer, load_tokenizer
from .vocab import VOCAB_SIZE

__all__ = ["BuiltinCorpus", "generate_sequence", "answer_mask", "DEFAULT_SEQ_LEN", "builtin_tokenizer",
           "load_tokenizer", "builtin_model_dir", "model_config", "init_model", "PRESETS", "TokenData",
           "open_data", "VOCAB_SIZE"]
