"""A local checkpoint directory opened for reading only: its config, shards and tensors.

:class:`SourceCheckpoint` finds the weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or pickled ``pytorch_model.bin`` / its index), checks
every shard before anything is written (missing, unreadable, truncated), and reads one
tensor at a time. Pickled files are only opened with ``torch.load(weights_only=True,
mmap=True)``. Nothing here ever opens a source file for writing. :func:`read_config` reads
``config.json`` with errors that name the file and the fault (``attnzoo info``, ``eval`` and
``uptrain`` use it too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_io import TensorInfo, read_header

__all__ = ["SourceCheckpoint", "Shard", "WEIGHT_SUFFIXES", "check_checkpoint_dir", "read_config"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Shard:
    """One weight file: its tensors in file order, and whether it is safetensors."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    safetensors: bool


def check_checkpoint_dir(path: Path, what: str = "") -> Path:
    """``path/config.json``, after checking that ``path`` is a directory that holds one.

    ``what`` prefixes the messages (e.g. ``"--model='x': "``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}{path}: no such checkpoint directory")
    if not path.is_dir():
        raise NotADirectoryError(f"{what}{path}: is a file, not a checkpoint directory (a directory with "
                                 "config.json and the weights)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{what}{cfg}: missing (a Hugging Face checkpoint directory has a config.json)")
    return cfg


def read_config(path: Path, what: str = "") -> dict:
    """The parsed ``config.json`` of checkpoint directory ``path``; errors name the file and the fault."""
    cfg = check_checkpoint_dir(path, what)
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}{cfg}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what}{cfg}: not a model config (expected a JSON object, found a {type(config).__name__})")
    if not isinstance(config.get("model_type"), str):
        raise ValueError(f"{what}{cfg}: not a Hugging Face model config (no 'model_type' key)")
    return config


class SourceCheckpoint:
    """Read-only view of a checkpoint directory."""

    def __init__(self, path):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.index_file: Path | None = None
        self._bin_cache: tuple[Path, dict] | None = None
        self.shards = self._open_shards()

    # ------------------------------------------------------------------ discovery
    def _files(self) -> list[Path]:
        for name in _INDEXES:
            idx = self.path / name
            if idx.is_file():
                self.index_file = idx
                try:
                    weight_map = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
                    if not isinstance(weight_map, dict):
                        raise TypeError(f"a {type(weight_map).__name__}")
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{idx}: not a valid index (needs a 'weight_map': {e})") from None
                files = []
                for f in weight_map.values():
                    if f not in files:
                        files.append(f)
                missing = [f for f in files if not (self.path / f).is_file()]
                if missing:
                    raise FileNotFoundError(f"{self.path / missing[0]}: shard listed in {name} is missing"
                                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
                self.weight_map = weight_map
                return [self.path / f for f in files]
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / name).is_file():
                self.weight_map = None
                return [self.path / name]
        raise FileNotFoundError(f"{self.path}: no weights (model.safetensors, model.safetensors.index.json, "
                                "pytorch_model.bin or its index)")

    def _open_shards(self) -> list[Shard]:
        shards = []
        for f in self._files():
            if f.suffix == ".safetensors":
                tensors, meta = read_header(f)
                order = dict(sorted(tensors.items(), key=lambda kv: kv[1].start))
                shards.append(Shard(f, order, meta, True))
            else:
                shards.append(Shard(f, self._bin_infos(f), {}, False))
        seen: dict[str, Path] = {}
        for s in shards:
            for name in s.tensors:
                if name in seen:
                    raise ValueError(f"tensor {name!r} appears in both {seen[name].name} and {s.path.name}")
                seen[name] = s.path
        if self.weight_map is not None:
            for name, f in self.weight_map.items():
                if seen.get(name) is None or seen[name].name != Path(f).name:
                    raise ValueError(f"{self.index_file.name} maps {name!r} to {f}, which does not hold it")
        return shards

    def _bin_infos(self, f: Path) -> dict[str, TensorInfo]:
        sd = self._load_bin(f)
        return {k: TensorInfo(k, f, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size())
                for k, t in sd.items()}

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == f:
            return self._bin_cache[1]
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # corrupt pickle/zip, or not weights-only
            raise ValueError(f"{f}: cannot be read as a weights-only PyTorch file ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise ValueError(f"{f}: expected a dict of tensors")
        self._bin_cache = (f, sd)
        return sd

    # ------------------------------------------------------------------ access
    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {k: v for s in self.shards for k, v in s.tensors.items()}

    def read(self, info: TensorInfo) -> torch.Tensor:
        """One tensor, read from disk (safetensors: only its own bytes)."""
        if info.start < 0:
            return self._load_bin(info.file)[info.name]
        buf = torch.empty(info.size, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            view, got = memoryview(buf.numpy()), 0
            while got < info.size:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{info.file}: truncated while reading {info.name!r}")
                got += n
        return buf.view(info.dtype).reshape(info.shape)

    def shared_with(self, info: TensorInfo) -> str | None:
        """For pickled files: the name of an earlier tensor sharing storage with ``info`` (tied weights)."""
        if info.start >= 0:
            return None
        sd = self._load_bin(info.file)
        t = sd[info.name]
        for k, other in sd.items():
            if k == info.name:
                return None
            if other.data_ptr() == t.data_ptr() and other.shape == t.shape:
                return k
        return None

    def total_bytes(self) -> int:
        return sum(i.size for i in self.tensors.values())
