#!/usr/bin/env bash
# One device call: the GPU tests, then the dense benchmark beside the peers. Results land in $OUT.
# Usage (on the GPU machine, repo root):  bash benchmarks/gpu_run.sh [pytest -k expression]
# Needs .bench/peers_bench.py (a copy of shared/bench/peers_bench.py) for the peers.
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attnzoo-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"
python3 -m pytest -m gpu -q -rs -p no:cacheprovider ${1:+-k "$1"} tests/ > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit: $?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -20
python3 -m attnzoo bench --variants ${BENCH_VARIANTS:-dense} ${PEERS:+--peers .bench/peers_bench.py --peer-groups $PEERS} --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench exit: $?"; tail -60 "$OUT/bench.log"
