"""The CUDA kernels against the float64 CPU reference (needs a GPU and the CUDA extension)."""
from __future__ import annotations

import pytest
import torch

from megatron_btm import ops
from megatron_btm.ops import _kernels
from mixing_cases import IGNORE, SHAPES, make_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
GRAD_TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (1e-3, 1e-2),
            torch.float16: (1e-3, 2e-3)}


def test_cuda_extension_is_active():
    assert ops.backend("cuda") == "cuda", _kernels.import_errors()


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "pm1e4"])
@pytest.mark.parametrize("dtype", list(GRAD_TOL))
@pytest.mark.parametrize("shape", SHAPES + [(4, 3, 50257), (2, 2, 262144)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_reference(shape, dtype, extreme):
    logits, lw, targets = make_case(*shape, dtype=dtype, extreme=extreme)
    lw = lw.float()
    gatol, grtol = GRAD_TOL[dtype]
    if extreme:
        gatol = max(gatol, 1e-3)  # fp32 conditioning at |L| ~ 1e4 (see test_mixing_op)
    L = logits.cuda().requires_grad_(True)
    w = lw.cuda().requires_grad_(True)
    nll, ell = ops.mix_nll(L, w, targets.cuda(), ignore_index=IGNORE)
    out = ops.mix_logprobs(L, w)
    rL = logits.double().requires_grad_(True)
    rw = lw.double().requires_grad_(True)
    rnll, rell = ops.reference.mix_nll(rL, rw, targets, IGNORE)
    rout = ops.reference.mix_logprobs(rL.detach(), rw.detach())
    # __expf/__logf (fast math) are ~2 ulp: outputs to 1e-5 relative.
    torch.testing.assert_close(nll.double().cpu(), rnll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ell.double().cpu(), rell, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double().cpu(), rout, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    w_nll = torch.rand(nll.shape, generator=g, dtype=torch.float64)
    w_ell = torch.randn(ell.shape, generator=g, dtype=torch.float64)
    ((nll.double() * w_nll.cuda()).sum() + (ell.double() * w_ell.cuda()).sum()).backward()
    ((rnll * w_nll).sum() + (rell * w_ell).sum()).backward()
    torch.testing.assert_close(L.grad.double().cpu(), rL.grad, atol=gatol, rtol=grtol)
    torch.testing.assert_close(w.grad.double().cpu(), rw.grad, atol=max(gatol, 1e-5), rtol=1e-4)
