"""Tiny Llama checkpoints for the main-job tests (built here, never downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_init(path: Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    from attnzoo.checkpoint_io import quiet_hf
    from attnzoo.data import builtin_tokenizer, init_model

    model = init_model(preset, seed=seed, **overrides)
    with quiet_hf():
        model.save_pretrained(str(path))
    builtin_tokenizer().save_pretrained(str(path))
    return path


def pretrained_tiny(root: Path, steps: int = 30) -> Path:
    """A tiny model pretrained for ``steps`` steps of 4 x 64 tokens (records pretraining_tokens)."""
    from attnzoo.uptrain import UptrainOptions, uptrain

    init = save_init(root / "tiny-init")
    out = root / "tiny-pretrained"
    uptrain(UptrainOptions(model=str(init), out=str(out), tokens=steps * 4 * 64, batch_size=4, seq_len=64,
                           lr=3e-3, stage="pretrain", progress=False, cpu=True))
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))
