#!/usr/bin/env bash
# Syntax- and type-checks the torch binding of the CUDA kernels (mixing_cuda.cpp) with g++ against
# the installed torch's headers (the CPU wheel ships c10/cuda too) and the CUDA toolkit's
# cuda_runtime.h, without a CUDA torch or a GPU. Usage:
#   csrc/check_cuda_binding.sh [SRC_DIR]   (PYTHON=..., CXX=..., CUDA_HOME=... override)
set -euo pipefail
PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}
HERE="$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")}" && pwd)"
CUDA_INC=""
NVCC_DIR=$(dirname "$(dirname "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")
for d in ${CUDA_HOME:-} "$NVCC_DIR" /usr/local/cuda; do
  if [ -f "$d/include/cuda_runtime.h" ]; then CUDA_INC="$d/include"; break; fi
done
[ -n "$CUDA_INC" ] || { echo "check_cuda_binding: no cuda_runtime.h (set CUDA_HOME)" >&2; exit 127; }
read -r TORCH_INC PY_INC < <("$PYTHON" -c "import os, sysconfig, torch.utils.cpp_extension as c; \
print(c.include_paths()[0], sysconfig.get_paths()['include'])")
[ -f "$TORCH_INC/c10/cuda/CUDAGuard.h" ] || { echo "check_cuda_binding: torch has no c10/cuda headers" >&2; exit 127; }
echo "$CXX -fsyntax-only mixing_cuda.cpp"
# -isystem: torch's own headers warn under -Wall -Wextra; -Werror then applies to ours only.
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheel lacks the generated cuda_cmake_macros.h.
"$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
  -DTORCH_EXTENSION_NAME=_mixing_cuda -DTORCH_API_INCLUDE_EXTENSION_H \
  -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" \
  -isystem "$CUDA_INC" -isystem "$PY_INC" -I "$HERE" "$HERE/mixing_cuda.cpp"
echo "check_cuda_binding: OK"
