"""The uptrained rows of the real-model quality benchmark, as one time-boxed, resumable GPU job.

For each selected row, in priority order (``ORDER``; ``--rows`` picks others): convert SmolLM2-135M-Instruct
with the row's typed patch config (the same rows as ``run.py``: ``rows.py``), save it (``save_pretrained``),
measure its training-free perplexity, uptrain it with distillation from the original, evaluate it, and append the
row to the results file at once. Stages of a row (``attnzoo.uptrain.uptrain``, the function behind
``attnzoo uptrain``; the log prints each stage as the equivalent ``attnzoo uptrain`` command line):

* the first row, ``original`` ("control: no conversion"), is the same uptraining of the *unconverted* model: the
  uptraining text is Python documentation like the evaluation text, so training alone lowers perplexity below the
  original's; a converted row is judged against this control as well as against the original;
* every row: ``--teacher ORIGINAL --data train.tokens --tokens N --mixed-precision bf16 --compile`` (on CUDA),
  all weights trained (lr ``--lr``);
* ``linear`` rows (learned feature maps, docs/linear.md): first ``--stage transfer`` (attention transfer: only
  the feature maps train, ``--transfer-tokens``, lr ``--transfer-lr``), its perplexity measured ("transfer
  only"), then the distillation stage with LoRA (``--lora-rank``, lr ``--lora-lr``; the feature maps train fully).

**Time box** (``--deadline SECONDS``, counted from the start): a row is started only when its estimated time fits
in what is left: conversion, evaluation and loading (the previous rows' measured overhead, at first
``--assume-overhead``) plus its tokens at the measured training rate (at first ``--assume-tokens-per-s``), with 10%
margin. A row that does not fit is skipped (a later, shorter one may still fit). **Resumable**: rows already in the
results file (or in ``--previous FILE``, copied in first) are skipped; a row that failed is recorded with its error
and skipped next time too unless ``--retry-failed``. A stage that fails with ``--compile`` is retried once without
it. After every row the Markdown table and the plot are rewritten (``rows.write_results``, the same code as
``run.py``), so a run killed at any point keeps every finished row.

Outputs (``--out DIR``, at most four files): ``NAME.json`` (the rows), ``NAME.md`` (table), ``NAME.png`` (plot),
``uptrain_rows.log`` (everything printed); NAME is ``--name`` (``quality_smollm2_uptrained``). Models live in
``--scratch`` (default WORK/uptrain_rows) and each row's are deleted when it is done.

On the GPU machine (the work directory carried to /tmp/q: smollm2-135m/, eval.safetensors, calib.safetensors,
train.tokens with its train.tokens.json sidecar; without the sidecar train.safetensors is used):

    python benchmarks/quality/uptrain_rows.py --work /tmp/q --out $OUT --deadline 540

and, for the next call, the results of the previous one brought back into the work tree (e.g. as
benchmarks/results/quality_smollm2_uptrained.json) so its rows are skipped:

    python benchmarks/quality/uptrain_rows.py --work /tmp/q --out $OUT --deadline 540 \\
        --previous benchmarks/results/quality_smollm2_uptrained.json

Defaults: 10M tokens per row (``--tokens``; 2M more for a linear row's transfer), sequences of 512 tokens (the
evaluation's length), 64 per step (32,768 tokens, 305 steps), AdamW lr 3e-4 with 5% warmup and cosine decay,
distillation alpha 0.5 (``attnzoo uptrain``'s default): 2 minutes a row at most on an H100 (``attnzoo uptrain``
measured 185k tokens/s there with distillation at 65k tokens a step, benchmarks/results/uptrain_throughput-h100.md;
the time box assumes 100k until a row has measured it).

On the CPU, end to end on the built-in model in about a minute (what ``tests/test_quality_uptrain_rows.py`` runs):

    python benchmarks/quality/uptrain_rows.py --model builtin --eval-data builtin:1 --calib builtin:0 \\
        --train builtin:0 --out /tmp/rows --device cpu --compile off --tokens 512 --transfer-tokens 256 \\
        --seq-len 64 --batch-size 2 --eval-sequences 2 --calib-sequences 2 --rows all
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows as R  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo.uptrain import UptrainOptions, uptrain  # noqa: E402
from attnzoo.uptrain.options import flag  # noqa: E402

#: the rows uptrained, most wanted first (keys of rows.training_free_rows)
ORDER = ("original", "mqa-pca", "sw127", "mla68-transmla", "mla87-transmla", "hedgehog-w64", "hedgehog",
         "linear-performer", "performer-w64", "reformer", "sw-reformer")
NAME = "quality_smollm2_uptrained"


def millions(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 100_000 else f"{n:,}"


def has_transfer(row: R.Row) -> bool:
    """Rows whose conversion has learned feature maps to transfer (the ``linear`` variant)."""
    return isinstance(row.config, attnzoo.Linear)


def label(row: R.Row, args) -> str:
    if row.config is None:  # the control: the same uptraining on the unconverted model
        return f"{R.CONTROL_LABEL} + distill {millions(args.tokens)}"
    if has_transfer(row):
        return (f"{row.label.removesuffix(', untrained')} + transfer {millions(args.transfer_tokens)} + LoRA-"
                f"{args.lora_rank} distill {millions(args.tokens)}")
    return f"{row.label} + distill {millions(args.tokens)}"


def row_tokens(row: R.Row, args) -> int:
    return args.tokens + (args.transfer_tokens if has_transfer(row) else 0)


def command_line(opts: UptrainOptions) -> str:
    """``opts`` as the ``attnzoo uptrain`` command line (fields that differ from the defaults)."""
    default = UptrainOptions(model="", out="")
    parts = ["attnzoo uptrain", f"--model {opts.model}", f"--out {opts.out}"]
    for f in dataclasses.fields(opts):
        v, d = getattr(opts, f.name), getattr(default, f.name)
        if f.name in ("model", "out", "extra_metadata") or v == d:
            continue
        if f.name == "progress":
            parts.append("--no-progress")
        elif isinstance(v, bool):
            parts.append(flag(f.name))
        else:
            parts.append(f"{flag(f.name)} {','.join(v) if isinstance(v, tuple) else v}")
    return " ".join(parts)


class Tee:
    """Writes to the console and the log file (the log of ``--out``)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, s):
        self.stream.write(s)
        self.log.write(s)
        self.log.flush()
        return len(s)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return False


class Clock:
    """What the deadline needs: the start, the training rate and the per-row overhead measured so far."""

    def __init__(self, deadline: float | None, tokens_per_s: float, overhead: float):
        self.t0, self.deadline = time.time(), deadline
        self.trained_tokens, self.trained_s = 0, 0.0
        self.overheads: list[float] = []
        self.assumed_rate, self.assumed_overhead = tokens_per_s, overhead

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - (time.time() - self.t0)

    def estimate(self, tokens: int) -> float:
        rate = self.trained_tokens / self.trained_s if self.trained_s else self.assumed_rate
        overhead = max(self.overheads) if self.overheads else self.assumed_overhead
        return 1.1 * (overhead + tokens / rate)

    def trained(self, tokens: int, seconds: float) -> None:
        self.trained_tokens += tokens
        self.trained_s += seconds


class Runner:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        from attnzoo.checkpoint_io import resolve_model_dir
        from attnzoo.data.tokenizer import load_tokenizer

        self.src = resolve_model_dir(str(args.model or args.work / "smollm2-135m"), "--model")
        self.tokenizer = load_tokenizer(self.src)
        self.base = R.load_model(self.src, device)
        self.table = R.training_free_rows(self.base.config)
        self.data = R.eval_data(args.eval_data or args.work / "eval.safetensors", args.eval_sequences,
                                self.base.config.vocab_size)
        self.calib = args.calib or str(args.work / "calib.safetensors")
        self.train = args.train or _train_data(args.work)
        self.batch = 8 if device.type == "cuda" else 1
        self.scratch = args.scratch or args.work / "uptrain_rows"
        if R.quantization_flagged(self.src):  # the teacher must load without it: a clean copy (see R.load_model)
            clean = self.scratch / "original"
            if not clean.is_dir():
                staged = clean.with_name(clean.name + ".tmp")
                if staged.exists():
                    shutil.rmtree(staged)
                self.base.save_pretrained(staged)
                self.tokenizer.save_pretrained(staged)
                staged.rename(clean)
            print(f"{self.src}/config.json carries a quantization_config (an old setup.py): the original is {clean}",
                  flush=True)
            self.src = clean

    # ---------------------------------------------------------------------------------- stages
    def _options(self, model: Path, out: Path, **kw) -> UptrainOptions:
        a = self.args
        cuda = self.device.type == "cuda"
        return UptrainOptions(model=str(model), out=str(out), data=str(self.train), seq_len=a.seq_len,
                              batch_size=a.batch_size, grad_accum=a.grad_accum, warmup=a.warmup,
                              mixed_precision="bf16" if cuda else "no",
                              compile=a.compile == "on" or (a.compile == "auto" and cuda),
                              cpu=not cuda, progress=False, force=True, log_every=a.log_every, seed=0, **kw)

    def _uptrain(self, opts: UptrainOptions, clock: Clock):
        print(f"$ {command_line(opts)}", flush=True)
        try:
            result = uptrain(opts)
        except Exception:
            if not opts.compile:
                raise
            traceback.print_exc()
            print("the stage failed with --compile: once more without it", flush=True)
            torch._dynamo.reset()
            opts = dataclasses.replace(opts, compile=False)
            print(f"$ {command_line(opts)}", flush=True)
            result = uptrain(opts)
        clock.trained(result.tokens, result.seconds)
        print(f"  {result.tokens:,} tokens in {result.seconds:.0f} s ({result.tokens / result.seconds:,.0f} "
              f"tokens/s), final loss {result.final_loss:.4f}", flush=True)
        return result

    def _perplexity(self, path: Path) -> float:
        from attnzoo.evaluate.metrics import score

        model = R.load_model(path, self.device)
        ppl = score(model, self.data, self.args.eval_sequences, batch_size=self.batch).perplexity
        del model
        return round(ppl, 2)

    # ---------------------------------------------------------------------------------- one row
    def run_row(self, row: R.Row, clock: Clock) -> dict:
        """Convert, uptrain (transfer first for linear rows), evaluate: the row's results."""
        a, t = self.args, time.time()
        work = self.scratch / row.key
        if work.exists():  # our own scratch of an earlier, interrupted or failed row
            shutil.rmtree(work)
        torch.manual_seed(0)
        model, convert_s = row.convert(self.base, self.calib, a.calib_sequences)
        model.save_pretrained(work / "converted")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(work / "converted")
        del model
        result = {"training-free": self._perplexity(work / "converted")}
        print(f"  converted in {convert_s:.0f} s; training-free perplexity {result['training-free']}", flush=True)
        start, seconds, tokens = work / "converted", 0.0, 0
        if has_transfer(row):
            r = self._uptrain(self._options(start, work / "transfer", tokens=a.transfer_tokens, stage="transfer",
                                            lr=a.transfer_lr), clock)
            seconds, tokens, start = seconds + r.seconds, tokens + r.tokens, work / "transfer"
            result["transfer only"] = self._perplexity(start)
            print(f"  transfer only: perplexity {result['transfer only']}", flush=True)
        lora = a.lora_rank if has_transfer(row) else 0
        r = self._uptrain(self._options(start, work / "uptrained", tokens=a.tokens, teacher=str(self.src),
                                        lora_rank=lora, lr=a.lora_lr if lora else a.lr), clock)
        seconds, tokens = seconds + r.seconds, tokens + r.tokens
        model = R.load_model(work / "uptrained", self.device)
        measured = R.measure(label(row, a), model, self.data, a.eval_sequences, decode_tokens=a.decode_tokens,
                             batch_size=self.batch)
        del model
        shutil.rmtree(work)
        measured.update(result, tokens=tokens, **{"uptrain s": round(seconds), "tokens/s": round(tokens / seconds),
                                                  "row s": round(time.time() - t)})
        clock.overheads.append(time.time() - t - seconds)
        return {k: measured.get(k) for k in R.UPTRAINED_COLUMNS if k in measured}


def _train_data(work: Path) -> Path:
    tokens = work / "train.tokens"
    return tokens if tokens.with_name(tokens.name + ".json").is_file() else work / "train.safetensors"


def recorded_run(results: Path) -> dict:
    """The machine, commit, date and command of the last run that measured a row of ``results`` (what the file
    records beside its rows)."""
    return {k: v for k, v in json.loads(results.read_text()).items() if k != "rows"}


def report(args, src: Path, results: Path) -> None:
    """Write ``results``' markdown and plot beside it, stamped with :func:`recorded_run`."""
    meta = recorded_run(results)
    rows = R.read_rows(results)
    rows = R.with_ratios(rows, R.original_row(rows), R.control_row(rows))
    a = args
    command = meta.get("command") or "not recorded"
    R.write_results(
        results.with_suffix(".md"), heading=f"Uptrained conversions of {R.model_name(src)}",
        intro=[f"Last run: {meta['machine']}, commit {meta['commit']}, {meta['date']}. Command: `{command}`.", "",
               R.text_source(a.work, src, a.eval_sequences, a.calib_sequences), "",
               f"Each row: the conversion of `benchmarks/quality/rows.py` (calibrated ones on {a.calib_sequences}"
               f"x{R.SEQ_LEN} tokens), its training-free perplexity, then `attnzoo uptrain` with distillation from "
               f"the original (alpha {UptrainOptions.alpha}, temperature {UptrainOptions.temperature}) on the "
               f"uptraining text, {a.batch_size} x {a.seq_len} tokens x {a.grad_accum} per step, AdamW lr {a.lr} "
               f"(all weights), warmup {a.warmup:.0%} then cosine; bf16 autocast and torch.compile on CUDA. Linear "
               f"rows: `--stage transfer` first ({millions(a.transfer_tokens)} tokens, lr {a.transfer_lr}, only the "
               f"feature maps), then the distillation with LoRA rank {a.lora_rank} (lr {a.lora_lr}; the feature "
               f"maps train fully). 'tokens' counts both stages; 'uptrain s' the training alone, 'row s' "
               f"everything (conversion, saving, evaluations)."],
        tables=[("Results (the original for reference):", rows, R.UPTRAINED_COLUMNS)],
        notes=["Perplexity on the held-out `tutorial/` text (never trained or calibrated on); KV bytes as in "
               "`quality_smollm2.md` (bf16 cache).",
               "'x control': against the control row, the same uptraining of the unconverted model. The uptraining "
               "text is Python documentation like the evaluation text, so uptraining alone lowers the original's "
               "perplexity; 'x control' is what the conversion costs after uptraining, 'x original' what a user "
               "gets against the checkpoint they started from."],
        plot_rows=rows, plot_title=f"{R.model_name(src)}, uptrained conversions; commit {meta['commit']}")


def run_rows(args, command: str) -> None:
    device = R.pick_device(args.device)
    rate = args.assume_tokens_per_s or (100_000 if device.type == "cuda" else 2_000)
    clock = Clock(args.deadline, rate, args.assume_overhead)
    print(f"{R.stamp()}: {command}", flush=True)
    if device.type == "cpu":
        torch.set_num_threads(1)
    runner = Runner(args, device)
    results = args.out / f"{args.name}.json"
    meta = {"commit": R.commit(), "date": R.stamp(), "machine": R.machine(device), "command": command}
    if args.previous and args.previous.is_file() and not results.is_file():
        shutil.copyfile(args.previous, results)
    wanted = [r for r in R.select(runner.table, "all" if args.rows == "all" else args.rows) if r.config is not None or r.key == "original"]
    order = [runner.table["original"].label] + [label(r, args) for r in wanted]
    done = {r["model"]: r for r in R.read_rows(results)}
    original = runner.table["original"].label
    if original not in done:
        R.upsert(results, R.measure(original, runner.base, runner.data, args.eval_sequences,
                                    decode_tokens=args.decode_tokens, batch_size=runner.batch), order, meta)
    for row in wanted:
        name = label(row, args)
        if name in done and (not done[name].get("error") or not args.retry_failed):
            print(f"== {name}: in the results already, skipped", flush=True)
            continue
        need, left = clock.estimate(row_tokens(row, args)), clock.left()
        if need > left:
            print(f"== {name}: needs about {need:.0f} s, {left:.0f} s left before --deadline: skipped", flush=True)
            continue
        print(f"== {name} (about {need:.0f} s; {left:.0f} s left)", flush=True)
        try:
            result = runner.run_row(row, clock)
        except Exception as e:
            traceback.print_exc()
            if (runner.scratch / row.key).exists():
                shutil.rmtree(runner.scratch / row.key)
            result = {"model": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}",
                      "device": R.device_name(device)}
        R.upsert(results, result, order, meta)
        report(args, runner.src, results)
        torch._dynamo.reset()  # compiled blocks of this row's modules: no recompile limit reached later, memory freed
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(args, runner.src, results)
    print(f"{R.stamp()}: done in {time.time() - clock.t0:.0f} s; wrote {results} and the .md/.png beside it",
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=R.DEFAULT_WORK, help="setup.py's work directory")
    ap.add_argument("--out", type=Path, help="folder of the four outputs (required unless --report)")
    ap.add_argument("--name", default=NAME, help="stem of the results files (default %(default)s)")
    ap.add_argument("--deadline", type=float, help="seconds from the start within which every started row must end")
    ap.add_argument("--rows", default=",".join(ORDER), help="keys or labels of rows.py, in the order to run "
                    "('all': every row but the original; default: the priority order %(default)s)")
    ap.add_argument("--previous", type=Path, help="a results file of an earlier run: its rows are copied in first "
                    "and not run again")
    ap.add_argument("--retry-failed", action="store_true", help="run rows recorded as failed again")
    ap.add_argument("--model", help="the source and teacher (default: WORK/smollm2-135m; 'builtin' works)")
    ap.add_argument("--eval-data", help="evaluation text (default: WORK/eval.safetensors)")
    ap.add_argument("--calib", help="calibration text (default: WORK/calib.safetensors)")
    ap.add_argument("--train", help="uptraining data (default: WORK/train.tokens, else WORK/train.safetensors)")
    ap.add_argument("--scratch", type=Path, help="where models are written (default: WORK/uptrain_rows)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--eval-sequences", type=int, default=24)
    ap.add_argument("--calib-sequences", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens timed for decode speed (0: skip)")
    ap.add_argument("--tokens", type=int, default=10_000_000, help="distillation tokens per row (%(default)s)")
    ap.add_argument("--transfer-tokens", type=int, default=2_000_000, help="attention-transfer tokens of a linear "
                    "row (%(default)s)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4, help="full-weight distillation (%(default)s)")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA distillation of linear rows (%(default)s)")
    ap.add_argument("--transfer-lr", type=float, default=1e-2, help="attention transfer (%(default)s)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=0.05)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile of the training (auto: on CUDA only)")
    ap.add_argument("--assume-tokens-per-s", type=float, default=None, help="training rate assumed before one is "
                    "measured (default: 100k on CUDA, 2k on the CPU)")
    ap.add_argument("--assume-overhead", type=float, default=60.0, help="seconds of conversion, saving and "
                    "evaluation per row assumed before one is measured (%(default)s)")
    ap.add_argument("--report", type=Path, metavar="JSON", help="rebuild the markdown and plot beside a results file "
                    "from its rows and the run it records (no model is loaded, nothing is measured)")
    args = ap.parse_args(argv)
    if args.report:
        if not args.report.is_file():
            raise SystemExit(f"--report {args.report}: no such results file")
        from attnzoo.checkpoint_io import resolve_model_dir

        # the recipe in the text is the recorded run's (its command parsed again); the model and the work
        # directory (sources.json) are this machine's
        command = recorded_run(args.report).get("command")
        run_args = ap.parse_args(shlex.split(command)[2:]) if command else args
        run_args.work, run_args.model = args.work, args.model
        report(run_args, resolve_model_dir(args.model, "--model") if args.model else args.work / "smollm2-135m",
               args.report)
        print(f"wrote {args.report.with_suffix('.md')} and the plot beside it")
        return 0
    if args.out is None:
        ap.error("--out is required (unless --report)")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality/uptrain_rows.py " + " ".join(argv if argv is not None else sys.argv[1:])
    streams = sys.stdout, sys.stderr
    with open(args.out / "uptrain_rows.log", "a") as log:
        sys.stdout, sys.stderr = Tee(streams[0], log), Tee(streams[1], log)
        try:
            run_rows(args, command)
        finally:
            sys.stdout, sys.stderr = streams
    return 0


if __name__ == "__main__":
    sys.exit(main())
