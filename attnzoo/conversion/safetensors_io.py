"""Streaming safetensors: read headers, copy tensors byte for byte, write shards tensor by tensor.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header
length ``N``, ``N`` bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``), then the data; offsets are relative to the end of the header.

:class:`ShardWriter` knows every output tensor's dtype and shape up front, writes the
header first and then each tensor's bytes in order: either copied from a source file
(``os.copy_file_range``, in the kernel, nothing held in memory) or from a tensor computed
on the fly. Peak memory is one tensor, not one shard.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TensorInfo", "read_header", "DTYPES", "dtype_name", "nbytes", "ShardWriter", "copy_range",
           "tensor_bytes"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors by attnzoo")
    return _NAMES[dtype]


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file: absolute byte range ``[start, start + size)``."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    size: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors file, checked against the file size.

    Raises ``ValueError`` naming the file when it is not valid safetensors or is truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a valid safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a valid safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base, end_max, out = 8 + n, 0, {}
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            b, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid safetensors file (bad entry for {name!r}: {err})") from None
        if end - b != nbytes(dtype, shape) or b < 0:
            raise ValueError(f"{path}: not a valid safetensors file ({name!r}: offsets {b}..{end} do not fit "
                             f"{e['dtype']}{list(shape)})")
        end_max = max(end_max, end)
        out[name] = TensorInfo(name, path, dtype, shape, base + b, end - b)
    if base + end_max > size:
        raise ValueError(f"{path}: truncated: the header describes {base + end_max} bytes, the file has {size}")
    return out, meta


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, progress: Callable[[int], Any] | None = None,
               chunk: int = 1 << 30) -> None:
    """Copy ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``'s current position."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < count:
        n = min(chunk, count - done)
        got = 0
        if use_cfr:
            try:
                got = os.copy_file_range(src_fd, dst_fd, n, offset + done)
            except OSError:
                use_cfr = False
        if not use_cfr:
            data = os.pread(src_fd, min(n, 64 << 20), offset + done)
            got = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst_fd, view):]
        if got <= 0:
            raise ValueError(f"unexpected end of file while copying {count} bytes at offset {offset}")
        done += got
        if progress:
            progress(got)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (contiguous, on CPU) without a second copy."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy())


@contextlib.contextmanager
def _naming(path: Path):
    """An ``OSError`` from a bare ``os.write``/``copy_file_range`` (a full disk) names no file: name ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


class ShardWriter:
    """Write one safetensors file whose tensors are all declared before the first byte.

    >>> w = ShardWriter(path, [("a", torch.float32, (2, 3)), ...], metadata={"format": "pt"})
    >>> w.copy("a", src_fd, offset)       # or w.write("a", tensor)
    >>> w.close()                         # checks every tensor was written, in order
    """

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self.order = []
        for name, dtype, shape in tensors:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [off, off + size]}
            self.order.append((name, dtype, tuple(shape), size))
            off += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as safetensors does
        self.total = off
        self.fd = None
        with _naming(self.path):
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(self.fd, memoryview(struct.pack("<Q", len(blob)) + blob))
            except BaseException:
                self.close(check=False)
                raise
        self.i = 0

    def _next(self, name):
        if self.i >= len(self.order) or self.order[self.i][0] != name:
            want = self.order[self.i][0] if self.i < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path.name}: writing {name!r}, expected {want!r}")
        entry = self.order[self.i]
        self.i += 1
        return entry

    def copy(self, name: str, src_fd: int, offset: int, progress=None) -> None:
        _, _, _, size = self._next(name)
        with _naming(self.path):
            copy_range(src_fd, self.fd, offset, size, progress)

    def copy_run(self, names: list[str], src_fd: int, offset: int, progress=None) -> None:
        """Copy several declared tensors that are contiguous in the source, in one kernel copy."""
        size = sum(self._next(n)[3] for n in names)
        with _naming(self.path):
            copy_range(src_fd, self.fd, offset, size, progress)

    def write(self, name: str, tensor: torch.Tensor, progress=None) -> None:
        _, dtype, shape, size = self._next(name)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{name}: got {tensor.dtype}{list(tensor.shape)}, declared {dtype}{list(shape)}")
        with _naming(self.path):
            _write_all(self.fd, tensor_bytes(tensor))
        if progress:
            progress(size)

    def close(self, check: bool = True) -> None:
        """Close the file; with ``check``, raise if a declared tensor was not written."""
        if self.fd is None:
            return
        try:
            if check and self.i != len(self.order):
                raise RuntimeError(f"{self.path.name}: {len(self.order) - self.i} declared tensor(s) not written")
        finally:
            os.close(self.fd)
            self.fd = None
