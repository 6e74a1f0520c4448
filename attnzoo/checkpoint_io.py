"""Reading and writing Hugging Face model directories: resolve, load, record metadata, write atomically.

attnzoo records what it did to a checkpoint in ``config.json`` under the key ``attnzoo``
(a dict): ``pretraining_tokens`` (tokens the model was pretrained on, when known),
``patch`` (a conversion), ``new_modules`` (modules a conversion created, trained fully
under LoRA), ``uptrain`` (a list, one entry per uptraining run). Plain ``transformers``
keeps unknown config keys, so the record survives ``save_pretrained``/``from_pretrained``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["BUILTIN", "resolve_model_dir", "load_config", "check_weights", "load_causal_lm", "read_metadata",
           "update_metadata", "check_new_output", "atomic_output_dir", "quiet_hf", "hf_progress_bars"]

BUILTIN = "builtin"  # the name that stands for the built-in model wherever a model directory is asked for


def resolve_model_dir(value: str | os.PathLike, option: str = "--model") -> Path:
    """The directory ``value`` names (``"builtin"``: the packaged model), checked to hold a config."""
    if str(value) == BUILTIN:
        from .data.model import builtin_model_dir

        return builtin_model_dir()
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{option}={str(value)!r}: no such directory (expected a Hugging Face model "
                                f"directory with config.json, or {BUILTIN!r} for the built-in model)")
    if not path.is_dir():
        raise NotADirectoryError(f"{option}={str(value)!r}: is a file, not a model directory (a directory with "
                                 "config.json and the weights)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{option}={str(value)!r}: not a model directory (no config.json in it)")
    return path


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def load_config(value: str | os.PathLike, option: str = "--model"):
    """The ``transformers`` config of model directory ``value``; errors name config.json and the fault
    (not JSON, not a model config, a model type this transformers does not know)."""
    from transformers import AutoConfig

    from .conversion.source import read_config

    path = resolve_model_dir(value, option)
    read_config(path, f"{option}: ")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # the file is JSON with a model_type: whatever fails here is about its content
        raise ValueError(f"{option}: {path / 'config.json'}: transformers cannot read this config "
                         f"({_one_line(e)})") from e


def check_weights(path: Path) -> None:
    """Check a model directory's config and weight files before loading (missing shards, files that are
    not safetensors, truncated files): errors name the file."""
    from .conversion.source import SourceCheckpoint

    SourceCheckpoint(path)


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' per-shard progress bars and info logs inside the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def hf_progress_bars(enabled: bool = True) -> Iterator[None]:
    """``enabled=False``: transformers' and huggingface_hub's own progress bars ("Loading weights",
    "Writing model shards", downloads) are off inside the block, through their public switches, and
    back as they were after it (what ``--no-progress`` means). ``enabled=True`` changes nothing."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_was, hub_was = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns off huggingface_hub's
    disable_progress_bars()
    try:
        yield
    finally:
        if hf_was:
            hf_logging.enable_progress_bar()  # also turns on huggingface_hub's ...
        if hub_was:
            enable_progress_bars()
        elif hf_was:
            disable_progress_bars()  # ... which were off before


def load_causal_lm(value: str | os.PathLike, option: str = "--model", dtype: torch.dtype | None = None):
    """Load a causal LM: through ``attnzoo.from_pretrained`` when attnzoo provides it (patched
    checkpoints), else plain ``transformers.AutoModelForCausalLM``. ``dtype=None`` keeps the stored dtype."""
    path = resolve_model_dir(value, option)
    load_config(path, option)
    check_weights(path)
    import attnzoo

    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    with quiet_hf():
        try:
            if hasattr(attnzoo, "from_pretrained"):
                return attnzoo.from_pretrained(str(path), **kwargs)
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except OSError:
            raise  # names its file
        except Exception as e:
            from .faults import is_safetensors_error

            if not isinstance(e, (ValueError, KeyError, RuntimeError)) and not is_safetensors_error(e):
                raise  # a bug: keep its traceback
            raise ValueError(f"{option}={str(value)!r}: cannot load a causal language model from it: "
                             f"{_one_line(e)}") from e


def read_metadata(model_or_config: Any) -> dict[str, Any]:
    cfg = getattr(model_or_config, "config", model_or_config)
    meta = getattr(cfg, "attnzoo", None)
    return dict(meta) if isinstance(meta, dict) else {}


def update_metadata(model_or_config: Any, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into ``config.attnzoo`` (other keys are kept) and return the new dict."""
    cfg = getattr(model_or_config, "config", model_or_config)
    meta = read_metadata(cfg)
    meta.update(updates)
    cfg.attnzoo = meta
    return meta


def check_new_output(path: str | os.PathLike, force: bool, option: str = "--out") -> Path:
    """Refuse an existing output path unless ``force``; the parent directory must exist and be writable."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{option}={str(path)!r} already exists; pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{option}={str(path)!r} exists and is not a directory")
    if not path.parent.exists():
        raise FileNotFoundError(f"{option}={str(path)!r}: the parent directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option}={str(path)!r}: the parent directory {str(path.parent)!r} is not writable "
                              "(permission denied)")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False, option: str = "--out",
                      notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` by a rename.

    On an exception (Ctrl-C and SIGTERM included) the temporary directory is removed and ``path``
    is left as it was; see :func:`attnzoo.output_dir.staged_dir` (``notes``, permissions).
    """
    from .output_dir import staged_dir

    path = check_new_output(path, force, option)
    with staged_dir(path, option, notes) as tmp:
        yield tmp
