"""Writing a checkpoint directory safely: through a temporary directory renamed at the end.

:func:`staged_output` refuses an existing DST unless ``force`` (and any DST that is SRC,
inside SRC or contains SRC, or whose parent is missing or not writable), writes into
``.DST.attnzoo-tmp-*`` next to DST, and swaps it into place only when everything succeeded
(:func:`attnzoo.output_dir.staged_dir`: on any error, Ctrl-C or SIGTERM the temporary
directory is removed and DST is as before; once DST is in place the conversion stands).
:func:`copy_side_files` copies tokenizer, generation and other small files from SRC (never weights).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from ..output_dir import staged_dir
from .source import WEIGHT_SUFFIXES

__all__ = ["check_destination", "staged_output", "copy_side_files"]

_SKIP = {"config.json", "README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Raise before any work when writing ``dst`` would lose data or touch ``src``."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"DST={dst} is SRC or inside it; attnzoo never writes into the source checkpoint")
    if dst in src.parents:
        raise ValueError(f"DST={dst} contains SRC; replacing it would delete the source checkpoint")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: DST's parent directory does not exist")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "DST's parent directory is not writable (permission denied)",
                              str(dst.parent))
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")


@contextlib.contextmanager
def staged_output(src: Path, dst: Path, force: bool, notes: list[str] | None = None):
    """Yield a temporary directory; on success it becomes ``dst`` (replacing it when ``force``).

    ``notes`` (e.g. ``ConversionResult.notes``) receives what happened after DST was in place:
    an interrupt that came too late to stop the conversion, an old copy left behind."""
    check_destination(src, dst, force)
    dst = Path(dst).resolve()
    with staged_dir(dst, "DST", notes, before_commit=lambda: check_destination(src, dst, force)) as tmp:
        yield tmp


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy SRC's top-level non-weight files (tokenizer, generation config, chat template, licence...)
    that DST does not have yet. Sub-directories (e.g. ``original/`` consolidated weights) are skipped."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if not f.is_file() or f.name in _SKIP or f.name.startswith("."):
            continue
        if f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            continue
        target = Path(dst) / f.name
        if target.exists():
            continue
        shutil.copy2(f, target)
        copied.append(f.name)
    return copied
