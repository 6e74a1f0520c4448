#!/usr/bin/env bash
# Uptrain a 100M+ parameter Llama on 2 GPUs with `accelerate launch --num_processes 2 -m attnzoo uptrain`.
#
# The model is built from a config (preset "100m": 16 layers, width 768, 12 heads, ~113M parameters),
# pretrained here on the built-in corpus (nothing is downloaded), converted MHA -> GQA-2 by
# mean-pooling, then uptrained with 5% of its pretraining tokens twice (cross-entropy, and
# distillation from the original), each followed by `attnzoo eval`. Everything, and the log
# multi_gpu_uptrain.log, goes to $OUT.
#
#   GPU machine:  OUT=/path/to/out bash examples/multi_gpu_uptrain.sh
#   CPU smoke:    OUT=/tmp/mg PRESET=tiny ACCEL_ARGS=--multi_gpu PRETRAIN_TOKENS=8192 FRACTION=0.25 BATCH=2 SEQ=64 \
#                 EVAL_SEQS=4 bash examples/multi_gpu_uptrain.sh
#   (on a machine without GPUs, `--multi_gpu` starts the processes through torchrun and they talk over
#   gloo; accelerate's own `--cpu` launcher would start one process unless MPI is set up)
#
# Knobs (environment): NPROC (2), PRESET (100m), ACCEL_ARGS ("--multi_gpu --mixed_precision bf16"), PRETRAIN_TOKENS
# (40M), FRACTION (0.05), BATCH per process (16), SEQ (256), PRETRAIN_LR (6e-4), UPTRAIN_LR (3e-4),
# EVAL_SEQS (256). For FSDP instead of DDP: ACCEL_ARGS="--config_file examples/accelerate_fsdp.yaml".
set -euo pipefail
: "${OUT:?set OUT to the directory for the run and its log}"
NPROC=${NPROC:-2}
PRESET=${PRESET:-100m}
ACCEL_ARGS=${ACCEL_ARGS:---multi_gpu --mixed_precision bf16}
PRETRAIN_TOKENS=${PRETRAIN_TOKENS:-40000000}
FRACTION=${FRACTION:-0.05}
BATCH=${BATCH:-16}
SEQ=${SEQ:-256}
PRETRAIN_LR=${PRETRAIN_LR:-6e-4}
UPTRAIN_LR=${UPTRAIN_LR:-3e-4}
EVAL_SEQS=${EVAL_SEQS:-256}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
LOG="$OUT/multi_gpu_uptrain.log"
exec > >(tee -a "$LOG") 2>&1
cd "$REPO"
echo "== $(date -u +%FT%TZ) multi_gpu_uptrain: preset=$PRESET nproc=$NPROC accel='$ACCEL_ARGS' out=$OUT"
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda devices', torch.cuda.device_count())"
LAUNCH=(accelerate launch --num_processes "$NPROC" --num_machines 1 $ACCEL_ARGS -m attnzoo)
COMMON=(--batch-size "$BATCH" --seq-len "$SEQ" --log-every 10 --force)

echo "== 1. build the $PRESET model from its config"
python examples/train_builtin_model.py --preset "$PRESET" --init-only --out "$OUT/init" --force

echo "== 2. pretrain on the built-in corpus ($PRETRAIN_TOKENS tokens, $NPROC processes)"
# the corpus is generated once into a memory-mapped token file: no per-step generation in the training loop
python -m attnzoo data prepare builtin:0 --tokens "$PRETRAIN_TOKENS" --seq-len "$SEQ" --out "$OUT/train.tokens" \
    --force --no-progress
"${LAUNCH[@]}" uptrain --stage pretrain --model "$OUT/init" --out "$OUT/base" --data "$OUT/train.tokens" \
    --tokens "$PRETRAIN_TOKENS" --lr "$PRETRAIN_LR" --warmup 0.02 --checkpoint-every 500 "${COMMON[@]}"
python -m attnzoo eval --model "$OUT/base" --num-seqs "$EVAL_SEQS" --json "$OUT/eval_base.json"

echo "== 3. convert MHA -> GQA-2 by mean-pooling"
python -m attnzoo convert "$OUT/base" "$OUT/gqa2" --to gqa --groups 2 --method mean --force
python -m attnzoo eval --model "$OUT/gqa2" --num-seqs "$EVAL_SEQS" --json "$OUT/eval_gqa2.json"

echo "== 4. uptrain with $FRACTION of the pretraining tokens: cross-entropy, then distillation"
"${LAUNCH[@]}" uptrain --model "$OUT/gqa2" --out "$OUT/gqa2-ce" --data "$OUT/train.tokens" --fraction "$FRACTION" --lr "$UPTRAIN_LR" \
    --checkpoint-every 200 "${COMMON[@]}"
python -m attnzoo eval --model "$OUT/gqa2-ce" --num-seqs "$EVAL_SEQS" --json "$OUT/eval_gqa2-ce.json"
"${LAUNCH[@]}" uptrain --model "$OUT/gqa2" --teacher "$OUT/base" --out "$OUT/gqa2-distill" --data "$OUT/train.tokens" \
    --fraction "$FRACTION" \
    --lr "$UPTRAIN_LR" --checkpoint-every 200 "${COMMON[@]}"
python -m attnzoo eval --model "$OUT/gqa2-distill" --num-seqs "$EVAL_SEQS" --json "$OUT/eval_gqa2-distill.json"

echo "== 5. summary"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from attnzoo.demo.report import text_table
out = Path(sys.argv[1])
names = [("original (MHA)", "base", None), ("gqa2-mean", "gqa2", None), ("gqa2-mean + ce", "gqa2-ce", "gqa2-mean"),
         ("gqa2-mean + distill", "gqa2-distill", "gqa2-mean")]
results = [{"name": n, "from": f, "eval": json.loads((out / f"eval_{d}.json").read_text())} for n, d, f in names]
table = text_table(results, title=f"multi-GPU uptraining ({out})")
print(table)
(out / "summary.txt").write_text(table + "\n")
PY
echo "== $(date -u +%FT%TZ) done; log: $LOG"
