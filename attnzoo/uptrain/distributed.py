"""FSDP for uptraining: the training module sharded with FSDP2 (``fully_shard``), from accelerate's FSDP config.

``accelerate launch --config_file examples/accelerate_fsdp.yaml -m attnzoo uptrain ...`` asks for FSDP; the
launcher passes the config to the processes (accelerate's ``FullyShardedDataParallelPlugin`` reads it). attnzoo
applies the sharding itself, with torch's public FSDP2 API, instead of through ``accelerator.prepare``:

* one code path on every device: accelerate enables FSDP only on accelerators, so its own path could not be
  run on a CPU (the 2-process gloo tests run this one);
* the frozen teacher can be sharded in the same module (``--teacher-placement shard``), its blocks in their
  own groups, and the output heads are used inside the root module's forward (see :mod:`.step`);
* the checkpoints stay attnzoo's safetensors shards (:mod:`.state`), the final state is gathered with
  ``torch.distributed.checkpoint.state_dict``.

Each repeated block (the model's ``_no_split_modules``, or ``fsdp_transformer_layer_cls_to_wrap`` when the
config names classes) of the student and teacher becomes one FSDP group; everything else (embeddings, final
norm, heads) is in the root group. Under bf16 mixed precision the parameters are gathered in bf16 and the
gradients reduced in float32, with float32 master weights and AdamW state.
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["fsdp_requested", "FsdpSettings", "fsdp_settings", "shard_module", "full_state_dict"]


def fsdp_requested(accelerator) -> bool:
    """Whether the launch asked for FSDP (accelerate's config, as the launcher passes it to the processes)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


class FsdpSettings:
    def __init__(self, reshard_after_forward: bool, activation_checkpointing: bool, block_names: set[str] | None):
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.block_names = block_names


def fsdp_settings(accelerator) -> FsdpSettings:
    """The FSDP config of this launch; options attnzoo does not implement are refused by name."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = accelerator.state.fsdp_plugin if getattr(accelerator.state, "fsdp_plugin", None) is not None \
        else FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_config.fsdp_version={plugin.fsdp_version}: attnzoo uptrain shards with FSDP2; set "
                         "fsdp_version: 2 (see examples/accelerate_fsdp.yaml)")
    offload = plugin.cpu_offload
    if getattr(offload, "offload_params", False) or type(offload).__name__ == "CPUOffloadPolicy":
        raise ValueError("fsdp_config.fsdp_offload_params=true: not supported by attnzoo uptrain (a model it "
                         "uptrains fits on the GPUs); set it to false")
    if accelerator.mixed_precision == "fp16":
        raise ValueError("--mixed-precision=fp16 with FSDP: use bf16 (no loss scaling needed); valid: no, bf16")
    names = plugin.transformer_cls_names_to_wrap
    return FsdpSettings(bool(plugin.reshard_after_forward), bool(plugin.activation_checkpointing),
                        set(names) if names else None)


def shard_module(module: nn.Module, accelerator, settings: FsdpSettings) -> int:
    """``fully_shard`` each block of ``module`` (a :class:`~attnzoo.uptrain.step.TrainModule`, on its device),
    then the module itself; returns the number of block groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .step import decoder_layer_names

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if accelerator.mixed_precision == "bf16" else MixedPrecisionPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=settings.reshard_after_forward)
    n = 0
    for model in (module.student, module.teacher):
        if model is None:
            continue
        names = settings.block_names or decoder_layer_names(model)
        for m in list(model.modules()):
            if type(m).__name__ in names:
                fully_shard(m, **kw)
                n += 1
    if n == 0:
        raise ValueError("FSDP: found no blocks to shard (the model names none in _no_split_modules); name the "
                         "block class in fsdp_config.fsdp_transformer_layer_cls_to_wrap")
    fully_shard(module, **kw)
    return n


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict of a sharded module on rank 0, on the CPU; empty on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
