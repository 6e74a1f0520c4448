""":func:`from_pretrained`: reload any checkpoint attnzoo wrote.

A native checkpoint (no ``attnzoo`` key in ``config.json``) is plain ``transformers`` and
loads through the model class's own ``from_pretrained``. A recorded patch is restored
exactly: ``transformers`` builds the model from its config through a subclass whose
``__init__`` re-applies the recorded patch structurally (no conversion) right after the
HF modules exist, then loads the weights with its own machinery (key renames, tied
embeddings, dtypes, devices), and attnzoo checks strictly that no tensor was missing,
unexpected or of the wrong shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..record import get_record
from .walker import restore_patch

__all__ = ["from_pretrained", "model_class_for", "patched_class"]


def model_class_for(config):
    """The ``transformers`` class named in ``config.architectures`` (else ``AutoModel``'s choice)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def patched_class(cls, record: dict):
    """A subclass of ``cls`` whose ``__init__`` re-applies ``record`` once the HF modules exist."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        restore_patch(self, record)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__, "_attnzoo_base": cls})


def _refresh_rope(model) -> None:
    """Recompute attnzoo modules' RoPE frequencies (non-persistent buffers a meta-device build leaves empty)."""
    from ..ops.rope import inv_frequencies
    from .hf import HFDenseAttention

    for m in model.modules():
        if isinstance(m, HFDenseAttention) and m.inv_freq is not None:
            rope = m.config.rope
            m.inv_freq = inv_frequencies(rope.rotary_dim or m.head_dim, rope.base, device=m.q_proj.weight.device)


def from_pretrained(path, **hf_kwargs: Any):
    """Load a checkpoint directory that attnzoo wrote (or any local ``transformers`` checkpoint).

    Args:
        path: a local directory with ``config.json`` and safetensors weights.
        **hf_kwargs: passed to ``transformers``' ``from_pretrained`` (``dtype``, ``device_map``,
            ``attn_implementation``, ...).

    Returns:
        the model in eval mode. With a recorded patch, any missing, unexpected or mis-shaped
        tensor raises ``ValueError`` (``transformers`` would only warn).
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    cls = model_class_for(config)
    record = get_record(config)
    if record is None:
        return cls.from_pretrained(path, **hf_kwargs)
    if hf_kwargs.get("output_loading_info"):
        raise ValueError("output_loading_info: attnzoo.from_pretrained checks the loading itself (strictly)")
    model, info = patched_class(cls, record).from_pretrained(path, config=config, output_loading_info=True,
                                                            **hf_kwargs)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {v[:3]}{' ...' if len(v) > 3 else ''}" for k, v in problems.items())
        raise ValueError(f"{path}: the weights do not match the model that config.json's attnzoo record describes "
                         f"({detail})")
    _refresh_rope(model)
    model.eval()
    return model
