"""The custom ops' registrations: schema, fake (meta) kernels, autograd, and torch.compile."""
from __future__ import annotations

import pytest
import torch

from megatron_btm import ops
from mixing_cases import IGNORE, make_case


def _cases():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits, lw, targets = make_case(3, 4, 37, dtype=dtype)
        yield dtype, logits, lw.to(torch.float64 if dtype == torch.float64 else torch.float32), \
            targets


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: str(c[0]).split(".")[-1])
def test_opcheck_forward_ops(case):
    _, logits, lw, targets = case
    logits.requires_grad_(True)
    lw.requires_grad_(True)
    torch.library.opcheck(torch.ops.btm.mix_nll.default, (logits, lw, targets, IGNORE, None))
    torch.library.opcheck(torch.ops.btm.mix_logprobs.default, (logits, lw, None))


def test_opcheck_backward_ops():
    logits, lw, targets = make_case(2, 3, 19, dtype=torch.float32)
    lw = lw.float()
    # Saved tensors as the forward ops produce them (shift = row max, logsum = log Σ exp(L − max)).
    _, _, shift, logsum = torch.ops.btm.mix_nll.default(logits, lw, targets, IGNORE, None)
    coef = torch.randn(2, 3)
    torch.library.opcheck(torch.ops.btm.mix_nll_backward.default,
                          (logits, shift, logsum, coef, targets, IGNORE, None))
    out, shift, logsum = torch.ops.btm.mix_logprobs.default(logits, lw, None)
    torch.library.opcheck(torch.ops.btm.mix_logprobs_backward.default,
                          (logits, lw, shift, logsum, out, torch.randn_like(out), None))


def test_fake_tensor_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        logits = torch.empty(4, 6, 50, dtype=torch.bfloat16)
        nll, ell = ops.mix_nll(logits, torch.empty(6, 4), torch.zeros(6, dtype=torch.long))
        out = ops.mix_logprobs(logits, torch.empty(6, 4))
    assert nll.shape == (6,) and ell.shape == (4, 6) and out.shape == (6, 50)
    assert nll.dtype == ell.dtype == out.dtype == torch.float32


def test_torch_compile_matches_eager():
    logits, lw, targets = make_case(3, 5, 41, dtype=torch.float32)
    lw = lw.float()

    def loss_fn(L, w):
        nll, ell = ops.mix_nll(L, w, targets, ignore_index=IGNORE)
        return nll.sum() + 0.1 * ell.sum() + ops.mix_logprobs(L, w).logsumexp(-1).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (loss_fn, compiled):
        L = logits.clone().requires_grad_(True)
        w = lw.clone().requires_grad_(True)
        loss = fn(L, w)
        loss.backward()
        grads.append((loss.detach(), L.grad, w.grad))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)
