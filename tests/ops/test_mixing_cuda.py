"""The CUDA kernels against the float64 CPU reference (needs a GPU and the CUDA extension; run
with `pytest -m gpu`). The checks live in cuda_checks.py; every fp32 check and the
compute-sanitizer run get their own process, since an illegal address kills the CUDA context
(and fp32 is where a wrong load would show: bf16/fp16 share no load path with it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_btm import ops
from megatron_btm.ops import _kernels
from mixing_cases import SHAPES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CASES = SHAPES + [(4, 3, 50257), (2, 2, 262144), (8, 64, 6283)]  # 6283: a TP=8 slice of 50257


def _shape_id(s):
    return "x".join(map(str, s))


def _in_own_process(*args: str, prefix: list[str] | None = None, timeout: int = 600,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = (prefix or []) + [sys.executable, os.path.join(HERE, "cuda_checks.py"), *args]
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)


@pytest.fixture(scope="module", autouse=True)
def cuda_extension():
    if ops.backend("cuda") != "cuda":
        pytest.fail(f"CUDA extension not built: {_kernels.import_errors()}")


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "pm1e4"])
@pytest.mark.parametrize("shape", CASES, ids=_shape_id)
def test_fp32_matches_reference_in_own_process(shape, extreme):
    proc = _in_own_process("case", *map(str, shape), "float32", "1" if extreme else "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "pm1e4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CASES, ids=_shape_id)
def test_half_dtypes_match_reference(shape, dtype, extreme):
    import cuda_checks
    cuda_checks.check_case(*shape, dtype, extreme)


def test_fp32_primitives_in_own_process():
    proc = _in_own_process("primitives", "float32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_primitives(dtype):
    import cuda_checks
    cuda_checks.check_primitives(dtype)


def test_tensor_arguments_on_another_device_are_refused():
    import megatron_btm._mixing_cuda as ext
    logits = torch.randn(2, 3, 64, device="cuda")
    targets = torch.zeros(3, dtype=torch.long, device="cuda")
    kn = torch.zeros(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="targets must be a CUDA tensor"):
        ext.stats(logits, targets.cpu(), 0, -100)
    for i, name in enumerate(("shift", "logsum", "coef")):
        args = [kn, kn, kn]
        args[i] = kn.cpu()
        with pytest.raises(RuntimeError, match=f"{name} must be a CUDA tensor"):
            ext.grad_logits(logits, *args, targets, 0, -100)
    with pytest.raises(RuntimeError, match="b must be a CUDA tensor"):
        ext.logprobs(logits, kn, kn.cpu())
    with pytest.raises(RuntimeError, match="shift must be a CUDA tensor"):
        ext.logprobs(logits, kn.cpu(), kn)
    with pytest.raises(RuntimeError, match="logits must be a contiguous CUDA"):
        ext.stats(logits.cpu(), targets, 0, -100)
    with pytest.raises(RuntimeError, match="coef must have 6 elements"):
        ext.grad_logits(logits, kn, kn, kn[:1], targets, 0, -100)


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        cand = os.path.join(d, "bin", "compute-sanitizer") if d else None
        if not found and cand and os.path.exists(cand):
            found = cand
    return found


@pytest.mark.slow
def test_compute_sanitizer_memcheck_small_cases():
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    # Without the caching allocator every tensor is its own allocation: an overrun is caught
    # instead of landing in a neighbour's cached block.
    # API errors off: torch's own probing calls may return errors; memcheck is about the kernels.
    prefix = [tool, "--tool", "memcheck", "--report-api-errors", "no", "--error-exitcode", "99"]
    proc = _in_own_process("sanitize", prefix=prefix,
                           env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, timeout=900)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, out
    assert "ERROR SUMMARY: 0 errors" in out
