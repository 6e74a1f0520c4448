#!/usr/bin/env bash
# Stage FlashAttention-4 (flash-attn-4, imported as flash_attn.cute) for the GPU machine, which has no package
# registry, in two carried folders: the CuTe DSL's CUDA 13 library wheel is 92 MB, more than the 64 MiB a device call
# carries, so its contents travel xz-compressed in two parts, one per call. Run here, from the repo root:
#
#   bash benchmarks/fa4_wheels.sh
#
# then, on the device machine, two calls in a row (the machine must stay warm between them):
#   1. carry [".fa1"]:          mkdir -p /tmp/fa && cp .fa1/cu13.part.aa /tmp/fa/
#   2. carry [".fa2", ...]:     bash .fa2/setup.sh && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
#                               && <tests or benchmarks>
# (the PYTHONPATH entry for dsl_packages stands in for the .pth file that `pip install --target` does not run).
# Versions: those the 2026-11-22 H200 results were measured with (benchmarks/results/sparse-h200.md).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
for d in .fa1 .fa2; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work" "$@"
}
dl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
rm -rf .fa1 .fa2 && mkdir -p .fa1 .fa2 "$work/cu13"
(cd "$work/cu13" && python3 -m zipfile -e "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar -cf - -C "$work/cu13" nvidia_cutlass_dsl | xz -9e -T2 > "$work/cu13.tar.xz"
sum=$(sha256sum "$work/cu13.tar.xz" | cut -d' ' -f1)
split -b 32000000 "$work/cu13.tar.xz" "$work/cu13.part."
if [ -e "$work/cu13.part.ac" ]; then echo "the compressed library no longer fits two 32 MB parts" >&2; exit 1; fi
mv "$work/cu13.part.aa" .fa1/ && mv "$work/cu13.part.ab" .fa2/
find "$work" -maxdepth 1 -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec mv {} .fa2/ \;
cat > .fa2/setup.sh <<EOF
# Reassemble and install FlashAttention-4 (flash_attn.cute) + the CuTe DSL into /tmp/site (written by
# benchmarks/fa4_wheels.sh).
set -e
cat /tmp/fa/cu13.part.aa .fa2/cu13.part.ab > /tmp/cu13.tar.xz
echo "$sum  /tmp/cu13.tar.xz" | sha256sum -c
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .fa2/*.whl
tar -xJf /tmp/cu13.tar.xz -C /tmp/site
EOF
du -sh .fa1 .fa2
