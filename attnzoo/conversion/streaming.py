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
adapter table in :mod:`attnzoo.patches.checkpoint`), so this module knows tensors, not models.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
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


def _compute_layer(plan: StreamPlan, layer: int) -> dict[str, torch.Tensor]:
    """All rewritten tensors of one layer, by name."""
    spec, src, found = plan.spec, plan.src, plan.layers[layer]

    def get(key):
        info = found.get(key)
        if info is None:
            return None
        t = src.read(info)
        return t.to(plan.dtype) if plan.dtype is not None and t.is_floating_point() else t

    o = get(f"{spec.o}.weight")
    if spec.layout == "concat":
        q, k, v = split_concat(get(f"{spec.qkv}.weight"), spec.heads, spec.kv_heads, spec.head_dim)
        qb, kb, vb = split_concat(get(f"{spec.qkv}.bias"), spec.heads, spec.kv_heads, spec.head_dim)
    else:
        q, k, v = get(f"{spec.q}.weight"), get(f"{spec.k}.weight"), get(f"{spec.v}.weight")
        qb, kb, vb = get(f"{spec.q}.bias"), get(f"{spec.k}.bias"), get(f"{spec.v}.bias")
    w = AttnWeights(q=q, k=k, v=v, o=o, heads=spec.heads, head_dim=spec.head_dim, q_bias=qb, k_bias=kb, v_bias=vb)
    w2 = convert_kv_heads(w, plan.groups, plan.method, spec.rope, where=f"layer {layer}")
    name = {key: info.name for key, info in found.items()}
    if spec.layout == "concat":
        out = {name[f"{spec.qkv}.weight"]: merge_concat(w2.q, w2.k, w2.v)}
        if f"{spec.qkv}.bias" in name:
            out[name[f"{spec.qkv}.bias"]] = merge_concat(w2.q_bias, w2.k_bias, w2.v_bias)
    else:
        out = {name[f"{spec.q}.weight"]: w2.q, name[f"{spec.k}.weight"]: w2.k, name[f"{spec.v}.weight"]: w2.v}
        for key, t in ((f"{spec.q}.bias", w2.q_bias), (f"{spec.k}.bias", w2.k_bias), (f"{spec.v}.bias", w2.v_bias)):
            if key in name:
                out[name[key]] = t
    out[name[f"{spec.o}.weight"]] = w2.o
    keep = plan.layer_outputs[layer]
    return {n: t for n, t in out.items() if n in keep}  # only what this plan rewrites


def run_stream(plan: StreamPlan, out_dir: Path, progress: Callable[[int], None] | None = None) -> list[str]:
    """Write every output shard (and the index when sharded) into ``out_dir``; returns the file names."""
    out_dir = Path(out_dir)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    written = []
    fds: dict[Path, int] = {}
    try:
        for shard in plan.shards:
            writer = ShardWriter(out_dir / shard.file, [(t.name, t.dtype, t.shape) for t in shard.tensors],
                                 shard.metadata)
            ok = False
            try:
                for t in shard.tensors:
                    info = t.source
                    if t.layer is not None:
                        if t.layer not in pending:
                            pending[t.layer] = _compute_layer(plan, t.layer)
                        tensor = pending[t.layer].pop(t.name).to(t.dtype)
                        if not pending[t.layer]:
                            del pending[t.layer]
                        writer.write(t.name, tensor, progress)
                    elif info.start < 0 or t.dtype != info.dtype:
                        writer.write(t.name, plan.src.read(info).to(t.dtype), progress)
                    else:
                        if info.file not in fds:
                            fds[info.file] = os.open(info.file, os.O_RDONLY)
                        writer.copy(t.name, fds[info.file], info.start, progress)
                ok = True
            finally:
                writer.close(check=ok)
            written.append(shard.file)
    finally:
        for fd in fds.values():
            os.close(fd)
    if plan.sharded:
        weight_map = {t.name: s.file for s in plan.shards for t in s.tensors}
        index = {"metadata": {"total_size": plan.bytes_out()}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append("model.safetensors.index.json")
    return written
