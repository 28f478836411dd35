#!/usr/bin/env bash
# Compiles every csrc/*.cu with nvcc for Hopper (sm_90) into a temporary directory, so a syntax or
# type error in the CUDA kernels fails CI on machines without a GPU. Usage:
#   csrc/check_cuda_compile.sh [SRC_DIR]   (default SRC_DIR: csrc/; NVCC=..., ARCH=sm_90 override)
set -euo pipefail
NVCC=${NVCC:-nvcc}
ARCH=${ARCH:-sm_90}
HERE="$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")}" && pwd)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: $NVCC not found" >&2; exit 127; }
shopt -s nullglob
sources=("$HERE"/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "check_cuda_compile: no .cu files in $HERE" >&2; exit 1; }

for src in "${sources[@]}"; do
  echo "nvcc -arch=$ARCH -c $(basename "$src")"
  # -Werror all-warnings: a narrowing or unused-variable slip fails here, not on the cluster.
  "$NVCC" -arch="$ARCH" -std=c++17 -O3 --use_fast_math -Werror all-warnings \
    -I "$HERE" -c "$src" -o "$OUT/$(basename "$src").o"
done
echo "check_cuda_compile: ${#sources[@]} file(s) OK"
