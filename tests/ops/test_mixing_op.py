"""mix_nll / mix_logprobs against the float64 naive expressions of ops.reference, on both the
compiled CPU kernels and the pure-PyTorch fallback; gradients included."""
from __future__ import annotations

import pytest
import torch

from megatron_btm import ops
from megatron_btm.ops import _kernels
from mixing_cases import IGNORE, SHAPES, make_case

BACKENDS = ["compiled", "torch-reference"]
# Per logits dtype: (atol, rtol) of the outputs (fp32-accumulated: ~1e-7 relative measured) and
# of the gradients (written in the logits' dtype: its rounding dominates for bf16/fp16).
TOL = {torch.float64: (1e-10, 1e-10, 1e-10, 1e-10), torch.float32: (1e-6, 1e-6, 2e-6, 1e-5),
       torch.bfloat16: (1e-6, 1e-6, 1e-3, 1e-2), torch.float16: (1e-6, 1e-6, 1e-3, 2e-3)}
# With logits of ±1e4 the expert log-likelihoods are ~-1e4, where one fp32 ulp is ~1e-3: the
# responsibilities (differences of such numbers) and so the gradients carry ~3e-4 (measured);
# an fp32 log_softmax has the same floor. Exact fp64 stays tight.
EXTREME_GRAD_ATOL = 1e-3


def _dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")  # float32, so `-k float32` selects the cases


def _tol(dtype, extreme):
    atol, rtol, gatol, grtol = TOL[dtype]
    if extreme and dtype != torch.float64:
        gatol = max(gatol, EXTREME_GRAD_ATOL)
    return atol, rtol, gatol, grtol


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "compiled":
        monkeypatch.delenv("BTM_OPS_BACKEND", raising=False)
        if ops.backend("cpu") != "cpp-openmp":
            pytest.skip(f"CPU extension not built: {_kernels.import_errors()}")
    else:
        monkeypatch.setenv("BTM_OPS_BACKEND", "torch-reference")
    return ops.backend("cpu")


def _ref_nll(logits, lw, targets):
    # The reference sees the same (rounded) logit values, in float64.
    return ops.reference.mix_nll(logits.double(), lw.double(), targets, IGNORE)


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "pm1e4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mix_nll_forward_and_grads(backend, shape, dtype, extreme):
    logits, lw, targets = make_case(*shape, dtype=dtype, extreme=extreme)
    lw = lw.to(torch.float64 if dtype == torch.float64 else torch.float32)
    atol, rtol, gatol, grtol = _tol(dtype, extreme)
    logits.requires_grad_(True)
    lw.requires_grad_(True)
    nll, ell = ops.mix_nll(logits, lw, targets, ignore_index=IGNORE)
    assert nll.dtype == ell.dtype == ops.reference.acc_dtype(dtype)

    ref_logits = logits.detach().double().requires_grad_(True)
    ref_lw = lw.detach().double().requires_grad_(True)
    ref_nll, ref_ell = _ref_nll(ref_logits, ref_lw, targets)
    torch.testing.assert_close(nll.double(), ref_nll, atol=atol, rtol=rtol)
    torch.testing.assert_close(ell.double(), ref_ell, atol=atol, rtol=rtol)
    assert torch.all(nll[targets == IGNORE] == 0) and torch.all(ell[:, targets == IGNORE] == 0)

    # Both outputs carry gradient: weights on nll and on expert_ll.
    g = torch.Generator().manual_seed(1)
    w_nll = torch.rand(nll.shape, generator=g, dtype=torch.float64)
    w_ell = torch.randn(ell.shape, generator=g, dtype=torch.float64)
    ((nll.double() * w_nll).sum() + (ell.double() * w_ell).sum()).backward()
    ((ref_nll * w_nll).sum() + (ref_ell * w_ell).sum()).backward()
    assert logits.grad.dtype == dtype and lw.grad.dtype == lw.dtype
    assert not torch.isnan(logits.grad).any() and not torch.isnan(lw.grad).any()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=gatol, rtol=grtol)
    # grad_lw is fp32 math on [N, K]: only the ±1e4 conditioning loosens it.
    lw_atol = 1e-10 if dtype == torch.float64 else (EXTREME_GRAD_ATOL if extreme else 2e-6)
    torch.testing.assert_close(lw.grad.double(), ref_lw.grad, atol=lw_atol, rtol=1e-5)


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "pm1e4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mix_logprobs_forward_and_grads(backend, shape, dtype, extreme):
    logits, lw, _ = make_case(*shape, dtype=dtype, extreme=extreme)
    lw = lw.to(torch.float64 if dtype == torch.float64 else torch.float32)
    atol, rtol, gatol, grtol = _tol(dtype, extreme)
    logits.requires_grad_(True)
    lw.requires_grad_(True)
    out = ops.mix_logprobs(logits, lw)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref_lw = lw.detach().double().requires_grad_(True)
    ref = ops.reference.mix_logprobs(ref_logits, ref_lw)
    # Entries of ~-2e4 (the -1e4 logits) carry fp32 rounding of that size: relative tolerance.
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=gatol, rtol=grtol)
    lw_atol = 1e-10 if dtype == torch.float64 else 1e-4  # Σ over V of fp32 terms
    torch.testing.assert_close(lw.grad.double(), ref_lw.grad, atol=lw_atol, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 11), (3, 4, 6), (1, 1, 5)])
def test_gradcheck_float64(backend, shape):
    logits, lw, targets = make_case(*shape, extreme=False)
    logits.requires_grad_(True)
    lw.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.mix_nll(a, b, targets, ignore_index=IGNORE), (logits, lw))
    assert torch.autograd.gradcheck(lambda a, b: ops.mix_logprobs(a, b), (logits, lw))


def test_log_weights_are_not_renormalised(backend):
    logits, lw, targets = make_case(3, 6, 50, prune=False, ignore=False)
    nll, ell = ops.mix_nll(logits, lw, targets)
    nll_shift, ell_shift = ops.mix_nll(logits, lw + 2.5, targets)
    torch.testing.assert_close(nll_shift, nll - 2.5)  # log Σ exp(lw + c + ll) = c + ...
    torch.testing.assert_close(ell_shift, ell)


def test_all_experts_pruned_gives_inf_without_nan(backend):
    logits, lw, targets = make_case(3, 4, 40, ignore=False)
    lw[2] = float("-inf")  # token 2: every expert pruned
    logits.requires_grad_(True)
    lw.requires_grad_(True)
    nll, ell = ops.mix_nll(logits, lw, targets)
    assert torch.isinf(nll[2]) and torch.isfinite(nll[[0, 1, 3]]).all()
    nll[[0, 1, 3]].sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(lw.grad).all()
    assert torch.all(logits.grad[:, 2] == 0)


def test_single_expert_equals_cross_entropy(backend):
    # Independent anchor: with K = 1 and lw = 0 the ensemble is the expert itself.
    logits, _, targets = make_case(1, 9, 300, extreme=False)
    nll, ell = ops.mix_nll(logits, torch.zeros(9, 1, dtype=torch.float64), targets)
    ce = torch.nn.functional.cross_entropy(logits[0], targets, ignore_index=IGNORE,
                                           reduction="none")
    torch.testing.assert_close(nll, ce)
    torch.testing.assert_close(ell[0], -ce)


def test_bad_inputs_name_the_problem():
    logits, lw, targets = make_case(2, 3, 10)
    with pytest.raises(ValueError, match=r"targets_N\[2\] = 10 is outside the vocabulary"):
        ops.mix_nll(logits, lw, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"log_weights_NK must be \[N, K\] = \[3, 2\]"):
        ops.mix_nll(logits, lw.t(), targets)
    with pytest.raises(ValueError, match=r"logits_KNV must be 3-D"):
        ops.mix_nll(logits[0], lw, targets)
    with pytest.raises(ValueError, match=r"targets_N must be \[N\] = \[3\]"):
        ops.mix_nll(logits, lw, targets[:2])
    with pytest.raises(ValueError, match=r"not supported"):
        ops.mix_logprobs(logits.to(torch.int32), lw)


def test_unknown_backend_lists_valid(monkeypatch):
    monkeypatch.setenv("BTM_OPS_BACKEND", "fortran")
    with pytest.raises(ValueError, match=r"'fortran'.*cpp-openmp.*torch-reference"):
        ops.backend()


def test_extension_kernels_match_reference_primitives():
    """The compiled primitives against the streaming reference ones, including a vocab slice
    offset (targets outside the slice give 0) and an all -inf row."""
    if ops.backend("cpu") != "cpp-openmp":
        pytest.skip(f"CPU extension not built: {_kernels.import_errors()}")
    import megatron_btm._mixing_cpu as ext
    logits, lw, targets = make_case(3, 5, 2500, dtype=torch.float32)
    logits[1, 2] = float("-inf")
    for start in (0, 700):
        got = ext.stats(logits, targets, start, IGNORE)
        want = ops.reference.stats(logits, targets, start, IGNORE)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
    shift, b = torch.randn(3, 5) * 10, torch.randn(3, 5)
    b[0, 1] = float("-inf")  # a pruned expert is skipped
    torch.testing.assert_close(ext.logprobs(logits, shift, b),
                               ops.reference.logprobs(logits, shift, b), atol=1e-4, rtol=1e-5)
    # grad_logits' contract: shift is the row max (finite: 0 for an all -inf row).
    row_max = logits.amax(-1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    lse, coef = torch.rand(3, 5) * 3, torch.randn(3, 5)
    coef[2, 0] = 0.0  # a zero coefficient writes a zero row
    for start in (0, 700):
        torch.testing.assert_close(
            ext.grad_logits(logits, shift, lse, coef, targets, start, IGNORE),
            ops.reference.grad_logits(logits, shift, lse, coef, targets, start, IGNORE),
            atol=1e-6, rtol=1e-5)


def test_missing_extension_falls_back_to_reference(monkeypatch):
    monkeypatch.delenv("BTM_OPS_BACKEND", raising=False)
    monkeypatch.setitem(_kernels._modules, "_mixing_cpu", None)  # as if the build was skipped
    assert ops.backend("cpu") == "torch-reference"
    logits, lw, targets = make_case(2, 3, 30)
    nll, _ = ops.mix_nll(logits, lw, targets, ignore_index=IGNORE)
    torch.testing.assert_close(nll, _ref_nll(logits, lw, targets)[0])

