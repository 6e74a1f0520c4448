#!/usr/bin/env bash
# One device call: the GPU tests, then `attnzoo bench` (each group beside its peers). Results land in $OUT:
# <group>-<device>.json and .md per group (e.g. dense-h200.md, sparse-h200.md, sparse-h200-scaling.png), bench.log,
# gpu_tests.log, device.txt. Copy the group files into benchmarks/results/ to publish them.
# Usage (on the GPU machine, repo root):  bash benchmarks/gpu_run.sh [pytest -k expression]
# Environment:
#   PEERS_BENCH     a copy of the shared bench/peers_bench.py (default .device/peers_bench.py; the run goes on
#                   without the peers, and says so, when it is missing)
#   BENCH_VARIANTS  groups to run (default dense,sparse; `attnzoo bench --help` lists them)
#   BENCH_ARGS      more `attnzoo bench` arguments, e.g. "--sections sliding,bigbird"; a group split over two calls:
#                   OUT=.device/out in both (an ignored folder that stays while the machine is warm) and
#                   "--sections scaling --merge" in the second
#   GPU_TESTS=0     skip the GPU tests
#   GPU_TEST_FILES  test files to run (default: tests/, every GPU test: more than one 10-minute call now; e.g.
#                   "tests/test_mla_gpu.py tests/test_linear_gpu.py tests/test_reformer_gpu.py" for one family batch)
#   GPU_TESTS_TIMEOUT  seconds the GPU tests may take (default 420), so the bench still runs in the same call
#   ATTNZOO_COMMIT  the commit the results name, where the tree has no .git
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attnzoo-out}; mkdir -p "$OUT"
ATTNZOO_COMMIT=${ATTNZOO_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}; export ATTNZOO_COMMIT
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/device.txt"
echo "commit ${ATTNZOO_COMMIT:-unknown}" | tee -a "$OUT/device.txt"
if [ "${GPU_TESTS:-1}" != 0 ]; then
  # shellcheck disable=SC2086  # GPU_TEST_FILES is split on purpose
  timeout "${GPU_TESTS_TIMEOUT:-420}" python3 -m pytest -m gpu -q -rs -p no:cacheprovider ${1:+-k "$1"} \
    ${GPU_TEST_FILES:-tests/} > "$OUT/gpu_tests.log" 2>&1
  echo "pytest exit: $?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
  grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head -20
fi
PEERS_BENCH=${PEERS_BENCH:-.device/peers_bench.py}
peers=()
if [ -f "$PEERS_BENCH" ]; then peers=(--peers "$PEERS_BENCH"); else echo "no $PEERS_BENCH: benchmarking without the peers"; fi
# shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
python3 -m attnzoo bench --variants "${BENCH_VARIANTS:-dense,sparse}" ${peers[@]+"${peers[@]}"} --out "$OUT" \
  ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench exit: $?"; grep -E "^wrote|error" "$OUT/bench.log" | tail -5; tail -n 100 "$OUT/bench.log"
