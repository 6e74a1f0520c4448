"""Exact training checkpoints in safetensors + JSON (no pickles): model, optimizer, scheduler, RNG, position.

A checkpoint is a directory ``step_NNNNNN/`` holding ``model.safetensors`` (the trainable
model's full state, LoRA wrappers included), ``optimizer.safetensors`` + ``optimizer.json``,
``scheduler.json``, ``rng_rank{R}.safetensors`` + ``rng_rank{R}.json`` (one per process) and
``progress.json`` (completed optimizer steps, tokens seen). The step count fixes the data
position: batches are a pure function of the step (see :mod:`attnzoo.uptrain.loop`).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_name"]


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
                tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
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


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def save_checkpoint(folder: Path, step: int, progress: dict, model, optimizer, scheduler, accelerator) -> Path:
    """Write checkpoint ``step`` under ``folder`` (collective: every process calls it).

    Under FSDP the sharded model/optimizer/RNG go through ``accelerator.save_state`` (accelerate's
    format) and only the scheduler and position are ours.
    """
    final = folder / checkpoint_name(step)
    tmp = folder / (checkpoint_name(step) + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _is_fsdp(accelerator):
        accelerator.save_state(str(tmp / "accelerate_state"))
        if accelerator.is_main_process:
            (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
            (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}))
        return _publish(folder, tmp, final, accelerator)
    rank = accelerator.process_index
    tensors, meta = _rng_state()
    save_file(tensors, str(tmp / f"rng_rank{rank}.safetensors"))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(meta))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}))
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


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns ``progress.json``."""
    progress = json.loads((path / "progress.json").read_text())
    if (path / "accelerate_state").is_dir():  # written under FSDP
        accelerator.load_state(str(path / "accelerate_state"))
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        return progress
    missing, unexpected = load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"),
                                     strict=False, device=str(accelerator.device))
    if missing or unexpected:
        raise ValueError(f"--resume={str(path)!r}: the checkpoint does not fit this model (missing "
                         f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}); resume with the same options")
    optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / "optimizer.safetensors")),
                                                    json.loads((path / "optimizer.json").read_text())))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = accelerator.process_index
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_rank{rank}.json").read_text()))
    return progress
