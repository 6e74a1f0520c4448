"""The built-in model: where it is packaged, and the Llama configs (presets) built on the corpus's vocabulary.

``builtin_model_dir()`` is a plain Hugging Face directory (config.json, model.safetensors,
tokenizer.json): ``transformers.AutoModelForCausalLM.from_pretrained`` loads it. It was
trained by ``examples/train_builtin_model.py`` (command, seed and loss in its README.md).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import check_choice
from . import vocab as V

__all__ = ["PRESETS", "builtin_model_dir", "model_config", "init_model"]

# name -> LlamaConfig options. "builtin" is the packaged model; "100m" is for the multi-GPU example.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "builtin": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12),
}


def builtin_model_dir() -> Path:
    path = Path(__file__).with_name("builtin_model")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {path}; rebuild it with "
                                "`python examples/train_builtin_model.py` (see docs/main-job.md)")
    return path


def model_config(preset: str = "builtin", **overrides):
    """A ``LlamaConfig`` (MHA: as many KV heads as query heads) for the built-in vocabulary."""
    from transformers import LlamaConfig

    check_choice("preset", preset, PRESETS)
    opts = dict(vocab_size=V.VOCAB_SIZE, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=V.BOS,
                eos_token_id=V.EOS, pad_token_id=V.PAD, **PRESETS[preset])
    opts.update(overrides)
    opts.setdefault("num_key_value_heads", opts["num_attention_heads"])
    return LlamaConfig(**opts)


def init_model(preset: str = "builtin", seed: int = 0, **overrides):
    """A freshly initialised ``LlamaForCausalLM`` (float32) for ``preset``, seeded."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(preset, **overrides))
    model.config.attnzoo = {"pretraining_tokens": 0}
    return model
