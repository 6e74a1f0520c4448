"""Convert a checkpoint's KV heads shard by shard, without building the model.

For architectures whose KV heads live in ``config.num_key_value_heads`` the conversion
only rewrites a few tensors per layer (``k_proj``/``v_proj``, or the fused ``qkv_proj``;
``q_proj``/``o_proj`` too for ``method="svd"``). :func:`plan_stream` lists every output
tensor with its dtype and shape; :func:`run_stream` writes each output shard with
:class:`~attnzoo.conversion.safetensors_io.ShardWriter`: untouched tensors are copied byte
for byte inside the kernel, a layer's attention tensors are read (only those), converted
by :func:`~attnzoo.conversion.methods.convert_kv_heads` (the function ``patch()`` uses),
written and dropped. Memory stays around one layer's attention weights.

The architecture facts come in a :class:`StreamSpec` built by the caller (from the
adapter table: :func:`attnzoo.patches.converters.stream_spec`), so this module knows tensors, not models.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .heads import AttnWeights, RopeSpec, check_groups
from .layouts import merge_concat, split_concat
from .methods import check_method, convert_kv_heads
from .safetensors_io import ShardWriter, TensorInfo, nbytes
from .source import SourceCheckpoint

__all__ = ["StreamSpec", "OutTensor", "OutShard", "StreamPlan", "plan_stream", "run_stream"]


@dataclass(frozen=True)
class StreamSpec:
    """Where one architecture keeps the attention tensors of a checkpoint.

    ``pattern`` matches a tensor name and captures ``layer``, ``proj`` (one of the names
    below) and ``kind`` (``weight``/``bias``). ``layout``: ``"separate"`` or ``"concat"``.
    """

    pattern: str
    layout: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: RopeSpec
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    tied_embeddings: tuple[str, str] | None = None  # (tied name, source name) when the config ties them


@dataclass
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: TensorInfo
    layer: int | None = None  # set when the tensor is computed by the conversion

    @property
    def size(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass
class OutShard:
    file: str
    tensors: list[OutTensor]
    metadata: dict[str, str]


@dataclass
class StreamPlan:
    src: SourceCheckpoint
    spec: StreamSpec
    groups: int
    method: str
    dtype: torch.dtype | None
    shards: list[OutShard]
    layers: dict[int, dict[str, TensorInfo]] = field(default_factory=dict)
    sharded: bool = False
    dropped: list[str] = field(default_factory=list)
    layer_outputs: dict[int, set[str]] = field(default_factory=dict)

    @property
    def computed(self) -> list[OutTensor]:
        return [t for s in self.shards for t in s.tensors if t.layer is not None]

    def bytes_out(self) -> int:
        return sum(t.size for s in self.shards for t in s.tensors)


def _out_name(path: Path, sharded: bool, i: int, n: int) -> str:
    if path.suffix == ".safetensors":
        return path.name
    if not sharded:
        return "model.safetensors"
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _roles(spec: StreamSpec, method: str, groups: int) -> set[str]:
    """Which projections a conversion rewrites."""
    if groups == spec.kv_heads:
        return set()
    fused = {spec.qkv} if spec.layout == "concat" else {spec.k, spec.v}
    if groups < spec.kv_heads and check_method(method).needs_o:
        fused |= {spec.o} | ({spec.q} if spec.layout == "separate" else set())
    return fused


def plan_stream(src: SourceCheckpoint, spec: StreamSpec, groups: int, method: str = "mean",
                dtype: torch.dtype | None = None) -> StreamPlan:
    """Check everything and list every output tensor; nothing is written."""
    check_method(method)
    check_groups(groups, spec.heads, spec.kv_heads, "this checkpoint")
    rx = re.compile(spec.pattern)
    layers: dict[int, dict[str, TensorInfo]] = {}
    for name, info in src.tensors.items():
        m = rx.fullmatch(name)
        if m:
            layers.setdefault(int(m.group("layer")), {})[f"{m.group('proj')}.{m.group('kind')}"] = info
    if not layers:
        raise ValueError(f"{src.path}: no attention tensor matches {spec.pattern!r}; is config.json's model_type right?")
    needed = [spec.qkv, spec.o] if spec.layout == "concat" else [spec.q, spec.k, spec.v, spec.o]
    for layer, found in sorted(layers.items()):
        missing = [p for p in needed if f"{p}.weight" not in found]
        if missing:
            raise ValueError(f"{src.path}: layer {layer} has no {missing[0]}.weight")
    roles = _roles(spec, method, groups)
    hd = spec.head_dim
    sharded = len(src.shards) > 1 or src.index_file is not None
    plan = StreamPlan(src, spec, groups, method, dtype, [], layers, sharded)
    for i, shard in enumerate(src.shards):
        outs = []
        for name, info in shard.tensors.items():
            if spec.tied_embeddings and name == spec.tied_embeddings[0] and src.shared_with(info):
                plan.dropped.append(name)  # a pickled alias of the tied embedding: HF re-ties it
                continue
            m = rx.fullmatch(name)
            out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
            shape, layer = info.shape, None
            if m and m.group("proj") in roles and not (m.group("proj") == spec.o and m.group("kind") == "bias"):
                layer = int(m.group("layer"))
                proj = m.group("proj")
                if proj == spec.qkv:
                    shape = ((spec.heads + 2 * groups) * hd, *info.shape[1:])
                elif proj in (spec.k, spec.v):
                    shape = (groups * hd, *info.shape[1:])
            outs.append(OutTensor(name, out_dtype, tuple(shape), info, layer))
            if layer is not None:
                plan.layer_outputs.setdefault(layer, set()).add(name)
        meta = {**shard.metadata, "format": "pt"}
        plan.shards.append(OutShard(_out_name(shard.path, sharded, i, len(src.shards)), outs, meta))
    return plan


def _compute_layer(plan: StreamPlan, layer: int, inputs: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """The rewritten tensors of one layer, by name. The tensors a method reads are exactly the ones
    it rewrites; ``inputs`` holds those already read (by name), the others are read here."""
    spec, src, found = plan.spec, plan.src, plan.layers[layer]
    full = check_method(plan.method).needs_o and plan.groups < spec.kv_heads  # q and o are read and rewritten
    inputs = inputs or {}

    def get(key, needed=True):
        info = found.get(key)
        if info is None or not needed:
            return None
        t = inputs[info.name] if info.name in inputs else src.read(info)
        return t.to(plan.dtype) if plan.dtype is not None and t.is_floating_point() else t

    if spec.layout == "concat":
        q, k, v = split_concat(get(f"{spec.qkv}.weight"), spec.heads, spec.kv_heads, spec.head_dim)
        qb, kb, vb = split_concat(get(f"{spec.qkv}.bias"), spec.heads, spec.kv_heads, spec.head_dim)
    else:
        k, v = get(f"{spec.k}.weight"), get(f"{spec.v}.weight")
        kb, vb = get(f"{spec.k}.bias"), get(f"{spec.v}.bias")
        q, qb = get(f"{spec.q}.weight", full), get(f"{spec.q}.bias", full)
        if q is None:  # not read: only its shape matters to the checks
            q = torch.empty(spec.heads * spec.head_dim, k.shape[1], dtype=k.dtype, device="meta")
    o = get(f"{spec.o}.weight", full)
    w = AttnWeights(q=q, k=k, v=v, o=o, heads=spec.heads, head_dim=spec.head_dim, q_bias=qb, k_bias=kb, v_bias=vb)
    w2 = convert_kv_heads(w, plan.groups, plan.method, spec.rope, where=f"layer {layer}")
    name = {key: info.name for key, info in found.items()}
    if spec.layout == "concat":
        out = {name[f"{spec.qkv}.weight"]: merge_concat(w2.q, w2.k, w2.v)}
        if f"{spec.qkv}.bias" in name:
            out[name[f"{spec.qkv}.bias"]] = merge_concat(w2.q_bias, w2.k_bias, w2.v_bias)
    else:
        out = {name[f"{spec.k}.weight"]: w2.k, name[f"{spec.v}.weight"]: w2.v}
        for key, t in ((f"{spec.k}.bias", w2.k_bias), (f"{spec.v}.bias", w2.v_bias)):
            if key in name:
                out[name[key]] = t
        if full:
            out[name[f"{spec.q}.weight"]] = w2.q
            if f"{spec.q}.bias" in name:
                out[name[f"{spec.q}.bias"]] = w2.q_bias
    if full:
        out[name[f"{spec.o}.weight"]] = w2.o
    keep = plan.layer_outputs[layer]
    return {n: t for n, t in out.items() if n in keep}  # only what this plan rewrites


def _open_sequential(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead, as cp does
    return fd


def _runs(tensors: list[OutTensor]):
    """Group a shard's tensors, in source order, into steps: ("copy", file, offset, [tensors]) for runs of
    untouched tensors contiguous in the same source file (one kernel copy each), ("write", t) for
    tensors re-encoded from memory (dtype change, pickled source), ("input", t) for tensors to convert."""
    steps: list[tuple] = []
    for t in tensors:
        info = t.source
        if t.layer is not None:
            steps.append(("input", t))
        elif info.start < 0 or t.dtype != info.dtype:
            steps.append(("write", t))
        elif steps and steps[-1][0] == "copy" and steps[-1][1] == info.file and \
                steps[-1][2] + sum(x.source.size for x in steps[-1][3]) == info.start:
            steps[-1][3].append(t)
        else:
            steps.append(("copy", info.file, info.start, [t]))
    return steps


class _Buffers:
    """Reusable byte buffers for the tensors read in passing: a 7B conversion reads the same sizes
    dozens of times, and fresh allocations would cost a page fault per 4 KiB each time."""

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, size: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return torch.empty(size, dtype=torch.uint8)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)


def _convert_and_release(plan: StreamPlan, layer: int, inputs: dict[str, torch.Tensor], buffers: _Buffers):
    out = _compute_layer(plan, layer, inputs)
    kept = {t.untyped_storage().data_ptr() for t in out.values()}
    for t in inputs.values():  # the inputs are no longer needed: their bytes go back to the pool
        if t.untyped_storage().data_ptr() not in kept and t.device.type == "cpu":
            buffers.put(torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()))
    return out


def _read_fd(fd: int, info: TensorInfo, buffers: _Buffers | None = None) -> torch.Tensor:
    buf = buffers.get(info.size) if buffers is not None else torch.empty(info.size, dtype=torch.uint8)
    view, got = memoryview(buf.numpy()), 0
    while got < info.size:
        n = os.preadv(fd, [view[got:]], info.start + got)
        if not n:
            raise ValueError(f"{info.file}: truncated while reading {info.name!r}")
        got += n
    return buf.view(info.dtype).reshape(info.shape)


def run_stream(plan: StreamPlan, out_dir: Path, progress: Callable[[int], None] | None = None) -> list[str]:
    """Write every output shard (and the index when sharded) into ``out_dir``; returns the file names.

    Each source shard is read once, front to back, through one file descriptor: runs of
    untouched tensors are copied inside the kernel (``copy_file_range``, no user-space buffer),
    the tensors to convert are read in passing and handed to a worker thread, which converts
    each layer while the copy goes on (both release the GIL). An output shard stores its
    untouched tensors first, in source order, and its rewritten tensors after them, so nothing
    waits for the conversion until the end of the shard; memory is bounded by the rewritten
    tensors of one shard.
    """
    out_dir = Path(out_dir)
    written: list[str] = []
    fds: dict[Path, int] = {}
    inputs: dict[int, dict[str, torch.Tensor]] = {}
    missing = {layer: set(names) for layer, names in plan.layer_outputs.items()}
    futures: dict[int, Future] = {}
    results: dict[int, dict[str, torch.Tensor]] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnzoo-convert")
    buffers = _Buffers()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core converts; the others stay free for the kernel's copying

    def fd_of(path):
        if path not in fds:
            fds[path] = _open_sequential(path)
        return fds[path]

    def result(layer):
        if layer not in results:
            if layer not in futures:  # its inputs span shards: read the rest directly
                futures[layer] = pool.submit(_convert_and_release, plan, layer, inputs.pop(layer, {}), buffers)
            results[layer] = futures.pop(layer).result()
        return results[layer]

    try:
        for shard in plan.shards:
            kept = [t for t in shard.tensors if t.layer is None]
            rewritten = [t for t in shard.tensors if t.layer is not None]
            writer = ShardWriter(out_dir / shard.file, [(t.name, t.dtype, t.shape) for t in kept + rewritten],
                                 shard.metadata)
            ok = False
            try:
                for step in _runs(shard.tensors):
                    if step[0] == "copy":
                        _, path, offset, run = step
                        writer.copy_run([t.name for t in run], fd_of(path), offset, progress)
                    elif step[0] == "write":
                        t = step[1]
                        writer.write(t.name, plan.src.read(t.source).to(t.dtype), progress)
                    else:
                        t = step[1]
                        if t.layer in results or t.layer in futures:
                            continue  # already converted (its inputs spanned shards and were read directly)
                        info = t.source
                        tensor = plan.src.read(info) if info.start < 0 else _read_fd(fd_of(info.file), info, buffers)
                        inputs.setdefault(t.layer, {})[t.name] = tensor
                        missing[t.layer].discard(t.name)
                        if not missing[t.layer] and t.layer not in futures and t.layer not in results:
                            futures[t.layer] = pool.submit(_convert_and_release, plan, t.layer, inputs.pop(t.layer),
                                                           buffers)
                for t in rewritten:
                    out = result(t.layer)
                    writer.write(t.name, out.pop(t.name).to(t.dtype), progress)
                    if not out:
                        del results[t.layer]
                ok = True
            finally:
                writer.close(check=ok)
            written.append(shard.file)
    finally:
        for f in futures.values():
            f.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)
        for fd in fds.values():
            os.close(fd)
    if plan.sharded:
        weight_map = {t.name: s.file for s in plan.shards for t in s.tensors}
        index = {"metadata": {"total_size": plan.bytes_out()}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append("model.safetensors.index.json")
    return written


def run_stream_with_bar(plan: StreamPlan, out_dir: Path, show: bool = True) -> list[str]:
    """:func:`run_stream` with a byte progress bar (``attnzoo convert``'s); returns the file names."""
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.bytes_out(), unit="B", unit_scale=True, unit_divisor=1024, desc="attnzoo convert",
               disable=not show)
    try:
        return run_stream(plan, out_dir, bar.update)
    finally:
        bar.close()
