"""CI gate for the CUDA kernels on machines without a GPU: every csrc/*.cu must compile with
`nvcc -arch=sm_90` (csrc/check_cuda_compile.sh), and the check itself must catch an error."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SCRIPT = CSRC / "check_cuda_compile.sh"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


def _run(src_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(src_dir)], capture_output=True, text=True,
                          timeout=600)


@needs_nvcc
def test_cuda_sources_compile_for_sm90():
    proc = _run(CSRC)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mixing_kernels.cu" in proc.stdout


@needs_nvcc
def test_compile_check_fails_on_a_type_error(tmp_path):
    for f in CSRC.glob("*.h"):
        shutil.copy(f, tmp_path)
    src = (CSRC / "mixing_kernels.cu").read_text()
    # Pass a float where the launcher's stream parameter is expected: a type error.
    broken = src.replace("vocab_start, ignore_index, mx, sm, tg);",
                         "vocab_start, ignore_index, mx, sm, 1.5f);", 1)
    assert broken != src, "the injected error no longer matches the source"
    (tmp_path / "mixing_kernels.cu").write_text(broken)
    proc = _run(tmp_path)
    assert proc.returncode != 0
    assert "error" in (proc.stdout + proc.stderr).lower()


BINDING = CSRC / "check_cuda_binding.sh"


def _binding(src_dir: Path) -> subprocess.CompletedProcess:
    import os
    import sys
    return subprocess.run(["bash", str(BINDING), str(src_dir)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})


def _binding_or_skip(src_dir: Path) -> subprocess.CompletedProcess:
    proc = _binding(src_dir)
    if proc.returncode == 127:  # no cuda_runtime.h, or a torch without c10/cuda headers
        pytest.skip(proc.stderr.strip())
    return proc


def test_cuda_binding_compiles_against_torch_headers():
    """mixing_cuda.cpp (the torch binding) type-checks with g++ -Wall -Wextra -Werror."""
    proc = _binding_or_skip(CSRC)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "check_cuda_binding: OK" in proc.stdout


@pytest.mark.slow
def test_binding_check_fails_on_a_type_error(tmp_path):
    for f in CSRC.glob("*.h"):
        shutil.copy(f, tmp_path)
    src = (CSRC / "mixing_cuda.cpp").read_text()
    broken = src.replace("c10::cuda::getCurrentCUDAStream()", "1.5f", 1)
    assert broken != src, "the injected error no longer matches the source"
    (tmp_path / "mixing_cuda.cpp").write_text(broken)
    proc = _binding_or_skip(tmp_path)
    assert proc.returncode != 0
    assert "error" in (proc.stdout + proc.stderr).lower()
