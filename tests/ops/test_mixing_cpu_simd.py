"""The CPU extension's SIMD paths (csrc/mixing_cpu_simd.h): AVX-512 intrinsics, AVX2+FMA
intrinsics, or the auto-vectorised loops, picked at run time from the CPU. The exp accuracy and
stats' one-pass (max + sum-exp) scheme are checked on the active path; every other path this CPU
can run is forced by environment variable in a subprocess that reruns the compiled-kernel tests."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_btm import ops
from megatron_btm.ops import _kernels

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ("avx512-intrinsics", "avx2-intrinsics", "auto-vectorised")
# Environment that forces each non-default path (a CPU without the ISA falls through further).
FORCE = {"avx2-intrinsics": {"BTM_MIXING_NO_AVX512": "1"},
         "auto-vectorised": {"BTM_MIXING_NO_AVX512": "1", "BTM_MIXING_NO_AVX2": "1"}}


@pytest.fixture(scope="module")
def ext():
    if ops.backend("cpu") != "cpp-openmp":
        pytest.skip(f"CPU extension not built: {_kernels.import_errors()}")
    import megatron_btm._mixing_cpu as mod
    return mod


def test_exp_relative_error_is_about_one_ulp(ext):
    """grad_logits with shift = logsum = 0, coef = 1 and no target is exactly exp(L): the path's
    vector exp over [-87, 0] against fp64, plus its special values."""
    x = torch.cat([torch.linspace(-87.0, 0.0, 400_003), -torch.rand(100_000),
                   torch.tensor([-87.5, -1e30, float("-inf"), float("nan"), -0.0, 0.0])])
    zero = torch.zeros(1, 1)
    got = ext.grad_logits(x.view(1, 1, -1), zero, zero, torch.ones(1, 1),
                          torch.tensor([-100]), 0, -100)[0, 0]
    want = torch.exp(x[:-6].double())
    rel = ((got[:-6].double() - want).abs() / want).max().item()
    assert rel < 1.5e-7, f"{ext.simd_path()}: max relative error {rel:.3g}"  # ~8e-8 measured
    assert got[-6:-3].tolist() == [0.0, 0.0, 0.0]  # below -87, -1e30, -inf: exact 0
    assert torch.isnan(got[-3]) and got[-2:].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("jump", [0.0, 30.0, 500.0], ids=["flat", "jump30", "jump500"])
def test_stats_one_pass_rescales_when_a_later_chunk_raises_the_max(ext, jump):
    """Rows of several 2048-element chunks whose max sits in a later chunk: below the one-pass
    headroom (rescaled) and above it (the chunk redone with its own max)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 9000, generator=g) * 4.0
    logits[0, :, 4100] += jump  # third chunk
    logits[1, :, 8999] += jump  # the tail of the last chunk
    targets = torch.tensor([0, 4100, 8999])
    mx, sm, tg = ext.stats(logits, targets, 0, -100)
    ref = logits.double()
    ref_mx = ref.amax(-1)
    torch.testing.assert_close(mx.double(), ref_mx, atol=0, rtol=0)
    torch.testing.assert_close(sm.double(), torch.exp(ref - ref_mx[..., None]).sum(-1),
                               atol=0, rtol=1e-6)
    torch.testing.assert_close(tg, logits[:, torch.arange(3), targets], atol=0, rtol=0)


def _path_under(env: dict[str, str]) -> str:
    code = "import torch, megatron_btm._mixing_cpu as e; print(e.simd_path())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("path", list(FORCE))
def test_other_simd_paths_match_reference_too(ext, path):
    """The compiled-kernel tests (fp32 and bf16 mix_nll / mix_logprobs, the primitives, the exp and
    one-pass checks above) rerun with `path` forced: what a CPU without AVX-512 (or without AVX2)
    gets."""
    assert ext.simd_path() in PATHS
    env = {**os.environ, **FORCE[path]}
    forced = _path_under(env)
    if path == "avx2-intrinsics" and torch.backends.cpu.get_cpu_capability() not in ("AVX2",
                                                                                     "AVX512"):
        pytest.skip(f"this CPU has no AVX2 + FMA (forcing {path} gives {forced})")
    assert forced == path
    if forced == ext.simd_path():
        pytest.skip(f"{path} is this CPU's own path: the other tests already ran it")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         os.path.join(HERE, "test_mixing_op.py"), os.path.join(HERE, "test_mixing_cpu_simd.py"),
         "-k", "((compiled and (float32 or bfloat16)) or extension_kernels or exp_relative "
               "or one_pass) and not other_simd_paths"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(HERE)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 50, out.stdout[-2000:]  # 53 cases selected
