"""The uptraining loop: accelerate (DDP/FSDP/mixed precision), distillation, LoRA, exact resume.

Data position is a pure function of the step: micro-batch ``a`` of optimizer step ``s`` on
process ``r`` of ``W`` reads sequences ``((s * accum + a) * W + r) * B`` onwards. So a run
resumed from the checkpoint of step ``s`` sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint_io import atomic_output_dir, check_new_output, hf_progress_bars, load_causal_lm, quiet_hf, \
    read_metadata, resolve_model_dir, update_metadata
from ..data.sources import TokenData, open_data
from ..data.tokenizer import load_tokenizer
from ..faults import add_note, interrupt_signal, is_safetensors_error, signal_name
from ..hf_compat import enable_activation_checkpointing
from ..output_dir import remove_tree
from .curves import append_log, plot_losses, read_log, truncate_log
from .context_parallel import ContextParallelTraining
from .lora import TrainableSummary, apply_lora, merge_lora, summarize_trainable
from .options import UptrainOptions, flag
from .schedule import warmup_cosine
from .distributed import fsdp_settings, full_state_dict, shard_module
from .state import is_fsdp, latest_checkpoint, load_checkpoint, save_checkpoint
from .step import TrainModule
from .transfer import start_transfer

__all__ = ["uptrain", "UptrainResult", "plan_budget"]

# options that change the trajectory: a resumed run must use the same ones
_RESUME_KEYS = ("model", "data", "tokens", "fraction", "teacher", "alpha", "temperature", "lr", "min_lr_ratio",
                "warmup", "weight_decay", "batch_size", "grad_accum", "seq_len", "max_grad_norm", "lora_rank",
                "lora_alpha", "lora_targets", "train_fully", "seed", "stage")


@dataclass
class UptrainResult:
    out: Path | None  # the saved model directory (None when stopped early by --stop-after)
    steps: int  # optimizer steps done
    total_steps: int
    tokens: int  # training tokens seen (all processes)
    budget_tokens: int
    fraction_of_pretraining: float | None
    final_loss: float  # the training objective (with a teacher: alpha * KL + (1 - alpha) * CE), last 10 steps
    seconds: float
    trainable: TrainableSummary
    log: list[dict] = field(default_factory=list)
    stopped: bool = False
    final_ce: float = float("nan")  # cross-entropy part, last 10 steps (what loss_curve.png plots)
    distilled: bool = False
    notes: list[str] = field(default_factory=list)  # what happened after the output was in place

    def rows(self) -> list[dict]:
        frac = "-" if self.fraction_of_pretraining is None else f"{100 * self.fraction_of_pretraining:.2f}%"
        losses = [("final cross-entropy (mean of last 10 steps, as plotted)", f"{self.final_ce:.4f}")]
        if self.distilled:
            losses.append(("final training objective (alpha*KL + (1-alpha)*CE)", f"{self.final_loss:.4f}"))
        rows = [("steps", f"{self.steps}/{self.total_steps}"), ("tokens", f"{self.tokens:,}"),
                ("of pretraining tokens", frac), *losses,
                ("wall time", f"{self.seconds:.1f} s"),
                ("throughput", f"{self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s"),
                ("trained", self.trainable.describe()),
                ("output", str(self.out) if self.out else "not saved (stopped early; continue with --resume)")]
        rows += [("note", n) for n in self.notes]
        return [{"": k, "value": v} for k, v in rows]


def _make_accelerator(opts: UptrainOptions):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # a second in-process run (tests, the demo) may change settings
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    has_device = acc.is_available() if acc is not None else torch.cuda.is_available()
    # without a device, cpu=True makes accelerate join a torchrun launch over gloo (else each process runs alone)
    return Accelerator(mixed_precision=opts.mixed_precision, cpu=opts.cpu or not has_device)


def plan_budget(opts: UptrainOptions, meta: dict, tokens_per_step: int) -> tuple[int, int, float | None]:
    """``(budget_tokens, steps, fraction_of_pretraining)``; steps never overshoot the budget."""
    pre = meta.get("pretraining_tokens") or None
    if opts.fraction is not None:
        if not pre:
            raise ValueError(f"--fraction={opts.fraction}: the model does not record its pretraining tokens "
                             f"(config.json 'attnzoo.pretraining_tokens' in {opts.model!r}); pass --tokens N instead")
        budget = int(opts.fraction * pre)
        source = f"--fraction={opts.fraction} (of {pre:,} pretraining tokens = {budget:,})"
    else:
        budget = opts.tokens
        source = f"--tokens={opts.tokens}"
    steps = budget // tokens_per_step
    if steps < 1:
        raise ValueError(f"{source} is less than one optimizer step of {tokens_per_step:,} tokens "
                         "(batch size x sequence length x grad accumulation x processes); raise the budget "
                         "or lower --batch-size/--seq-len")
    return budget, steps, (steps * tokens_per_step / pre) if pre else None


def _load_teacher(opts: UptrainOptions, student, tokenizer, dtype=torch.float32):
    if opts.teacher is None:
        return None
    teacher = load_causal_lm(opts.teacher, option="--teacher", dtype=dtype)
    sv, tv = student.config.get_text_config().vocab_size, teacher.config.get_text_config().vocab_size
    if sv != tv:
        raise ValueError(f"--teacher={opts.teacher!r}: its vocabulary has {tv} tokens but the student's "
                         f"(--model={opts.model!r}) has {sv}; distillation needs the same tokenizer")
    t_tok = load_tokenizer(resolve_model_dir(opts.teacher, "--teacher"))
    if tokenizer is not None and t_tok is not None and t_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--teacher={opts.teacher!r}: its tokenizer differs from the student's "
                         f"(--model={opts.model!r}); distillation needs the same tokenizer")
    teacher.eval().requires_grad_(False)
    return teacher


def _work_dir(opts: UptrainOptions, out: Path, main: bool) -> Path:
    work = out.with_name(out.name + ".partial")
    if opts.resume is None and work.exists():
        if not opts.force:
            raise FileExistsError(f"--out={str(out)!r}: an interrupted run left checkpoints in {str(work)!r}; "
                                  "pass --resume to continue it or --force to start over")
    return work


def _resume_path(opts: UptrainOptions, work: Path) -> Path | None:
    if opts.resume is None:
        return None
    if opts.resume == "latest":
        found = latest_checkpoint(work / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {str(work / 'checkpoints')!r} (checkpoints are "
                                    "written every --checkpoint-every steps)")
        return found
    path = Path(opts.resume)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"--resume={opts.resume!r}: not a checkpoint directory (no progress.json)")
    return path


def _check_same_options(opts: UptrainOptions, work: Path) -> None:
    saved_file = work / "options.json"
    if not saved_file.is_file():
        return
    saved, now = json.loads(saved_file.read_text()), json.loads(json.dumps(opts.to_dict()))
    for key in _RESUME_KEYS:
        if saved.get(key) != now.get(key):
            raise ValueError(f"--resume: {flag(key)}={now.get(key)!r} differs from the interrupted run's "
                             f"{saved.get(key)!r}; an exact resume needs the same options")


def _load_checkpoint(path: Path, *args) -> dict:
    """:func:`load_checkpoint`, with unreadable files (invalid JSON, a cut-off safetensors file) named."""
    try:
        return load_checkpoint(path, *args)
    except Exception as e:
        if not isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, KeyError)) and not is_safetensors_error(e):
            raise
        raise ValueError(f"--resume: the checkpoint {str(path)!r} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); resume from an earlier one (--resume PATH) or start "
                         "over with --force") from e


def _indices(step: int, micro: int, opts: UptrainOptions, world: int, rank: int) -> range:
    start = ((step * opts.grad_accum + micro) * world + rank) * opts.batch_size
    return range(start, start + opts.batch_size)


def uptrain(opts: UptrainOptions) -> UptrainResult:
    """Run one uptraining (or pretraining) job; see :class:`UptrainOptions`. Every process calls it.

    On an error, Ctrl-C or SIGTERM, ``--out`` is left as it was and ``OUT.partial/`` is kept only
    when it holds a checkpoint to ``--resume`` from (the exception's notes say so), else removed.
    Once ``--out`` is in place the run has succeeded, whatever interrupt comes after. ``progress=False``
    also silences transformers' own progress bars for the run."""
    owned: dict = {}  # "work": OUT.partial once this run writes it; "result": its result, .out set once saved
    try:
        with hf_progress_bars(opts.progress):
            return _uptrain(opts, owned)
    except BaseException as e:
        result = owned.get("result")
        if result is None or result.out is None:  # --out not written
            if "work" in owned:
                _leave_work(owned["work"], e)
            raise
        if not isinstance(e, KeyboardInterrupt):
            raise
        result.notes.append(f"{signal_name(interrupt_signal(e))} arrived after --out {result.out} was in place: "
                            "it is complete")
        return result


def _leave_work(work: Path, e: BaseException) -> None:
    """After a failed or interrupted run: keep OUT.partial when it holds a checkpoint to resume from, else
    remove it; notes on ``e`` say which (or name what could not be removed)."""
    for t in (work / "checkpoints").glob("*.tmp"):  # a checkpoint cut off while being written
        remove_tree(t)
    found = latest_checkpoint(work / "checkpoints")
    if found is not None:
        add_note(e, f"checkpoints kept in {work} (newest: {found.name}): continue with --resume, or start over "
                    "with --force")
        return
    gone, stopped = remove_tree(work)
    if not gone:
        how = f"removal stopped by {signal_name(interrupt_signal(stopped))}" if stopped else "could not be removed"
        add_note(e, f"{work} is left ({how}): delete it")


def _uptrain(opts: UptrainOptions, owned: dict) -> UptrainResult:
    opts.validate()
    model_dir = resolve_model_dir(opts.model, "--model")
    out = Path(opts.out)
    if opts.resume is None:
        check_new_output(out, opts.force)
    accelerator = _make_accelerator(opts)
    main = accelerator.is_main_process
    work = _work_dir(opts, out, main)
    resume_from = _resume_path(opts, work)
    if resume_from is not None:
        _check_same_options(opts, work)

    from accelerate.utils import set_seed

    set_seed(opts.seed)
    fsdp = is_fsdp(accelerator)
    _check_distributed(opts, accelerator, fsdp)
    settings = fsdp_settings(accelerator) if fsdp else None
    shard_teacher = opts.teacher_placement == "shard"
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    meta = read_metadata(model)
    # a replicated teacher is frozen: bf16 weights under bf16 mixed precision (half the memory, same matmuls);
    # a sharded one stays float32, as FSDP casts every parameter of a shard group alike
    t_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" and not shard_teacher else torch.float32
    teacher = _load_teacher(opts, model, tokenizer, t_dtype)
    vocab = model.config.get_text_config().vocab_size
    data: TokenData = open_data(opts.data, opts.seq_len, tokenizer=tokenizer, vocab_size=vocab, shuffle_seed=opts.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    cp = ContextParallelTraining(opts.context_parallel, accelerator, model) if opts.context_parallel > 1 else None
    data_world, data_rank = (cp.data_world, cp.data_rank) if cp is not None else (world, rank)  # cp: same data
    tokens_per_step = opts.batch_size * data.seq_len * opts.grad_accum * data_world
    budget, total_steps, fraction = plan_budget(opts, meta, tokens_per_step)

    train_fully = opts.train_fully if opts.train_fully is not None else tuple(meta.get("new_modules", []))
    if opts.stage == "transfer":  # attention transfer: only the feature maps train (uptrain/transfer.py)
        start_transfer(model)
    if opts.lora_rank:
        model = apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_targets, train_fully)
    summary = summarize_trainable(model)
    if opts.activation_checkpointing or (settings is not None and settings.activation_checkpointing):
        enable_activation_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model)
    module = TrainModule(model, teacher, teacher_sharded=shard_teacher, alpha=opts.alpha,
                         temperature=opts.temperature, loss_chunk=opts.loss_chunk, compile=opts.compile,
                         context_parallel=cp, transfer=opts.stage == "transfer")
    module.to(accelerator.device)  # before the optimizer, whose fused kernel checks the parameters' device
    if fsdp:  # sharded by attnzoo (see .distributed); the optimizer then holds the shards
        shard_module(module, accelerator, settings)
    params = [p for p in module.student.parameters() if p.requires_grad]
    # CUDA: the fused kernel, one launch for all parameters (FSDP's DTensor shards keep the foreach kernel);
    # CPU: one parameter at a time, as the foreach kernel's temporaries span every parameter (~1 GB at 135M)
    kernel = {"fused": True} if accelerator.device.type == "cuda" and not fsdp else \
        {"foreach": False} if accelerator.device.type == "cpu" else {}
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=opts.weight_decay, **kernel)
    scheduler = warmup_cosine(optimizer, total_steps, opts.warmup, opts.min_lr_ratio)
    if not fsdp:
        module, optimizer = accelerator.prepare(module, optimizer)
    if teacher is not None and not shard_teacher:
        teacher.to(accelerator.device)
    if opts.compile:
        accelerator.unwrap_model(module).compile_blocks()

    if main:
        owned["work"] = work  # from here on a failure removes it, or keeps it for --resume (uptrain())
        if resume_from is None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / "options.json").write_text(json.dumps(opts.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    log_path = work / "loss_log.jsonl"
    step, seconds_before = 0, 0.0
    if resume_from is not None:
        progress = _load_checkpoint(resume_from, module, optimizer, scheduler, accelerator)
        step, seconds_before = progress["step"], progress.get("seconds", 0.0)
        if main:
            truncate_log(log_path, step)
        accelerator.wait_for_everyone()

    if main:
        print(f"uptrain: {total_steps} steps x {tokens_per_step:,} tokens = {total_steps * tokens_per_step:,} tokens "
              f"on {world} process(es) ({'fsdp' if fsdp else accelerator.distributed_type.value.lower()}"
              f"{', ' + str(accelerator.state.backend) if world > 1 else ''}"
              f"{f', context parallel {cp.size}' if cp is not None else ''}), {accelerator.device}, mixed precision {accelerator.mixed_precision}; "
              f"{summary.describe()}; {_speed_note(opts, module, accelerator, teacher)}"
              + (f"; resuming at step {step}" if step else ""), flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (main and opts.progress), unit="step",
               desc=opts.stage, dynamic_ncols=True)
    module.train()
    t0 = time.perf_counter()
    stopped = False
    pin = accelerator.device.type == "cuda"
    while step < total_steps:
        sums = torch.zeros(3, device=accelerator.device)
        for micro in range(opts.grad_accum):
            ids = data.batch(_indices(step, micro, opts, data_world, data_rank))
            ids = ids.pin_memory().to(accelerator.device, non_blocking=True) if pin else ids.to(accelerator.device)
            sync = micro == opts.grad_accum - 1
            if fsdp:
                module.set_requires_gradient_sync(sync)  # reduce-scatter on the last micro-batch only
            ctx = contextlib.nullcontext() if sync or fsdp else accelerator.no_sync(module)
            with ctx:
                with accelerator.autocast():
                    loss, parts = module(ids)
                accelerator.backward(loss / opts.grad_accum)
            sums += torch.stack([loss.detach(), parts["ce"], parts.get("kl", torch.zeros((), device=ids.device))])
        if opts.max_grad_norm > 0:
            if fsdp:  # DTensor gradients: torch's clipping computes the global norm
                torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            else:
                accelerator.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        means = accelerator.reduce(sums / opts.grad_accum, reduction="mean").tolist()
        if main and (step % opts.log_every == 0 or step == total_steps):
            entry = {"step": step, "tokens": step * tokens_per_step, "loss": means[0], "ce": means[1],
                     "lr": scheduler.get_last_lr()[0],
                     "seconds": round(seconds_before + time.perf_counter() - t0, 4)}
            if teacher is not None:
                entry["kl"] = means[2]
            if accelerator.device.type == "cuda":  # this process's peak, for memory budgets
                entry["max_mem_gb"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 3)
            append_log(log_path, entry)
        bar.update(1)
        bar.set_postfix(loss=f"{means[0]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        elapsed = seconds_before + time.perf_counter() - t0
        if opts.checkpoint_every and step % opts.checkpoint_every == 0 and step < total_steps:
            save_checkpoint(work / "checkpoints", step, {"tokens": step * tokens_per_step, "seconds": elapsed},
                            module, optimizer, scheduler, accelerator)
        if opts.stop_after is not None and step >= opts.stop_after and step < total_steps:
            stopped = True
            break
    bar.close()
    seconds = seconds_before + time.perf_counter() - t0
    log = read_log(log_path) if main else []
    result = UptrainResult(None, step, total_steps, step * tokens_per_step, budget, fraction, _tail_mean(log, "loss"),
                           seconds, summary, log, stopped, final_ce=_tail_mean(log, "ce"),
                           distilled=opts.teacher is not None)
    if stopped:
        accelerator.wait_for_everyone()
        return result

    # under FSDP the shards are gathered into a full state on rank 0 (CPU)
    state = _student_state(full_state_dict(module) if fsdp else accelerator.get_state_dict(module))
    if main:
        owned["result"] = result
        student = accelerator.unwrap_model(module).student
        _save(opts, out, work, student, _drop_tied(state, student), tokenizer, result, meta)
    accelerator.wait_for_everyone()
    return result


def _check_distributed(opts: UptrainOptions, accelerator, fsdp: bool) -> None:
    if opts.teacher_placement == "shard" and not fsdp:
        kind = "a single process" if accelerator.num_processes == 1 else \
            f"{accelerator.distributed_type.value.lower()} over {accelerator.num_processes} processes"
        raise ValueError(f"--teacher-placement=shard: shards the teacher with FSDP, but this run is {kind}; "
                         "launch it with an FSDP config "
                         "(accelerate launch --config_file examples/accelerate_fsdp.yaml) or use 'replicate'")
    if opts.lora_rank and fsdp:
        raise ValueError(f"--lora-rank={opts.lora_rank} with FSDP: LoRA runs under DDP or on one device (its "
                         "trainable state is small; FSDP's sharded adapters cannot be merged on one process)")


def _speed_note(opts: UptrainOptions, module, accelerator, teacher) -> str:
    inner = accelerator.unwrap_model(module)
    loss = f"chunked loss ({opts.loss_chunk} positions)" if inner.chunked else "full-logits loss"
    bits = [loss] + (["compiled"] if opts.compile else []) + \
        (["activation checkpointing"] if opts.activation_checkpointing else [])
    if teacher is not None:
        placed = {"replicate": "replicated", "shard": "sharded"}[opts.teacher_placement]
        bits.append(f"teacher {placed} ({str(next(teacher.parameters()).dtype)[6:]})")
    return ", ".join(bits)


def _student_state(state: dict | None) -> dict | None:
    """The student's entries of the training module's state dict, under the student's own names."""
    if state is None:
        return None
    return {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}


def _drop_tied(state: dict | None, model) -> dict | None:
    """``state`` without the second names of shared parameters (a tied ``lm_head.weight``): what
    ``save_pretrained`` writes for the model itself, whatever gathered the state."""
    if state is None:
        return None
    seen, dup = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dup.add(name)
        seen.add(id(p))
    return {k: v for k, v in state.items() if k not in dup}


def _tail_mean(log: list[dict], key: str, n: int = 10) -> float:
    """Mean of ``key`` over the last ``n`` logged steps (NaN without a log)."""
    tail = [e.get(key, e["loss"]) for e in log[-n:]]
    return sum(tail) / len(tail) if tail else float("nan")


def _run_record(opts: UptrainOptions, result: UptrainResult) -> dict:
    rec = {"tokens": result.tokens, "steps": result.steps, "data": opts.data, "lr": opts.lr, "seed": opts.seed,
           "final_loss": round(result.final_loss, 5), "final_ce": round(result.final_ce, 5)}
    if result.fraction_of_pretraining is not None:
        rec["fraction_of_pretraining"] = round(result.fraction_of_pretraining, 6)
    if opts.teacher is not None:
        rec.update(teacher=str(opts.teacher), alpha=opts.alpha, temperature=opts.temperature)
    if opts.lora_rank:
        rec["lora"] = {"rank": opts.lora_rank, "targets": result.trainable.lora, "trained_fully": result.trainable.full}
    rec.update(opts.extra_metadata)
    return rec


def _save(opts, out, work, model, state, tokenizer, result, meta) -> None:
    """Write --out (sets ``result.out`` once it is in place) and remove OUT.partial unless --keep-checkpoints."""
    model = merge_lora(model) if opts.lora_rank else model
    if opts.lora_rank:  # the merged weights, not the adapter-wrapped state
        state = None
    rec = _run_record(opts, result)
    if opts.stage == "pretrain":
        update_metadata(model, pretraining_tokens=int(meta.get("pretraining_tokens") or 0) + result.tokens,
                        pretraining=meta.get("pretraining", []) + [rec])
    else:
        update_metadata(model, uptrain=meta.get("uptrain", []) + [rec])
    with atomic_output_dir(out, force=True, notes=result.notes) as tmp:
        with quiet_hf():
            model.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        shutil.copy(work / "loss_log.jsonl", tmp / "loss_log.jsonl")
        plot_losses({opts.stage: result.log}, tmp / "loss_curve.png", title=f"{opts.stage}: {out.name}")
    result.out = out  # in place: whatever happens from here on, the run succeeded
    if not opts.keep_checkpoints:
        gone, stopped = remove_tree(work)
        if stopped is not None:
            result.notes.append(f"{signal_name(interrupt_signal(stopped))} arrived after --out {out} was in place: "
                                "it is complete")
        if not gone:
            result.notes.append(f"{work} is left ({'removal interrupted' if stopped else 'could not be removed'}): "
                                "delete it")
