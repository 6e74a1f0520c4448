"""Exact training checkpoints in safetensors + JSON (no pickles): model, optimizer, scheduler, RNG, position.

A checkpoint is a directory ``step_NNNNNN/`` holding ``model.safetensors`` (the trainable
model's full state, LoRA wrappers included), ``optimizer.safetensors`` + ``optimizer.json``,
``scheduler.json``, ``rng_rank{R}.safetensors`` + ``rng_rank{R}.json`` (one per process) and
``progress.json`` (completed optimizer steps, tokens seen). The step count fixes the data
position: batches are a pure function of the step (see :mod:`attnzoo.uptrain.loop`).

Under FSDP the checkpoint is sharded: each process writes its own shard of the student's parameters
and of the AdamW state, ``model_rank{R}.safetensors`` and ``optimizer_rank{R}.safetensors`` (+ ``.json``),
with nothing gathered; ``progress.json`` records the number of processes, and ``--resume`` needs the
same number (each process reads back exactly the shard it wrote, so the resumed run is exact).
Everything is safetensors + JSON, as without FSDP (accelerate's ``save_state`` writes pickles).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_name", "is_fsdp"]


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step_*") if (p / "progress.json").is_file())
    return done[-1] if done else None


def _optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, val in entry.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = _local(val).detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                               float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def is_fsdp(accelerator) -> bool:
    from .distributed import fsdp_requested

    return fsdp_requested(accelerator)


def _local(t):
    """The process's own shard of a DTensor (FSDP2), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _student(module, accelerator):
    """The student inside the prepared :class:`~attnzoo.uptrain.step.TrainModule` (or ``module`` itself)."""
    inner = accelerator.unwrap_model(module)
    return getattr(inner, "student", inner)


def save_checkpoint(folder: Path, step: int, progress: dict, model, optimizer, scheduler, accelerator) -> Path:
    """Write checkpoint ``step`` under ``folder`` (collective: every process calls it).

    Under FSDP every process writes its shards (see the module doc); otherwise the main process
    writes the full model and optimizer state."""
    final = folder / checkpoint_name(step)
    tmp = folder / (checkpoint_name(step) + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank, sharded = accelerator.process_index, is_fsdp(accelerator)
    tensors, meta = _rng_state()
    save_file(tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(meta))
    student = _student(model, accelerator)
    if sharded:
        shard = {n: _local(p).detach().cpu().contiguous() for n, p in student.named_parameters()}
        save_file(shard, str(tmp / f"model_rank{rank}.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / f"optimizer_rank{rank}.safetensors"))
        (tmp / f"optimizer_rank{rank}.json").write_text(json.dumps(opt_meta))
    elif accelerator.is_main_process:
        save_model(student, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    if accelerator.is_main_process:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        info = {"step": step, **progress}
        if sharded:
            info.update(sharded=True, processes=accelerator.num_processes)
        (tmp / "progress.json").write_text(json.dumps(info))
    return _publish(folder, tmp, final, accelerator)


def _publish(folder: Path, tmp: Path, final: Path, accelerator) -> Path:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(p for p in folder.glob("step_*") if not p.name.endswith(".tmp"))
        for stale in done[:-2]:  # keep the newest two
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _device_name(device: torch.device) -> str:
    """What safetensors accepts: ``cpu`` (it refuses ``cpu:0``, the device of a gloo process), ``cuda:N``."""
    return "cpu" if device.type == "cpu" else str(device)


def _as_param_layout(saved: torch.Tensor, param) -> torch.Tensor:
    """A saved local shard back as a DTensor laid out like ``param`` (FSDP2), or the tensor as is."""
    if not hasattr(param, "device_mesh") or saved.dim() == 0:
        return saved
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(saved.to(param.device), param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride())


def _load_sharded(path: Path, progress: dict, model, optimizer, accelerator) -> None:
    world, rank = accelerator.num_processes, accelerator.process_index
    if progress.get("processes") != world:
        raise ValueError(f"--resume={str(path)!r}: the checkpoint is sharded over {progress.get('processes')} "
                         f"processes but this run has {world}; resume with the same number of processes")
    student = _student(model, accelerator)
    shard = load_file(str(path / f"model_rank{rank}.safetensors"))
    names = dict(student.named_parameters())
    if set(shard) != set(names):
        missing, unexpected = sorted(set(names) - set(shard)), sorted(set(shard) - set(names))
        raise ValueError(f"--resume={str(path)!r}: the checkpoint does not fit this model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); resume with the same options")
    with torch.no_grad():
        for n, p in names.items():
            _local(p).copy_(shard[n])
    state = _optimizer_from_files(load_file(str(path / f"optimizer_rank{rank}.safetensors")),
                                  json.loads((path / f"optimizer_rank{rank}.json").read_text()))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state["state"] = {i: {k: _as_param_layout(v, params[i]) if torch.is_tensor(v) and k != "step" else v
                          for k, v in entry.items()} for i, entry in state["state"].items()}
    optimizer.load_state_dict(state)


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns ``progress.json``."""
    progress = json.loads((path / "progress.json").read_text())
    if bool(progress.get("sharded")) != is_fsdp(accelerator):
        how = "sharded (FSDP)" if progress.get("sharded") else "not sharded"
        raise ValueError(f"--resume={str(path)!r}: the checkpoint is {how} but this run "
                         f"{'is' if is_fsdp(accelerator) else 'is not'} under FSDP; resume the way it was started")
    if progress.get("sharded"):
        _load_sharded(path, progress, model, optimizer, accelerator)
    else:
        missing, unexpected = load_model(_student(model, accelerator), str(path / "model.safetensors"),
                                         strict=False, device=_device_name(accelerator.device))
        if missing or unexpected:
            raise ValueError(f"--resume={str(path)!r}: the checkpoint does not fit this model (missing "
                             f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}); resume with the same "
                             "options")
        optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / "optimizer.safetensors")),
                                                        json.loads((path / "optimizer.json").read_text())))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = accelerator.process_index
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_rank{rank}.json").read_text()))
    return progress
