"""Checks of the CUDA mixing kernels against the fp64 references, importable by the `gpu` tests
and runnable one per process (an illegal address kills the CUDA context, so fp32 checks and the
compute-sanitizer run each get a fresh process):

    python tests/ops/cuda_checks.py case K N V DTYPE EXTREME     # e.g. case 4 3 50257 float32 1
    python tests/ops/cuda_checks.py primitives DTYPE
    python tests/ops/cuda_checks.py sanitize                     # small cases, every kernel/dtype

Each check raises AssertionError on a mismatch; as a script the exit status says (0 = pass).
"""
from __future__ import annotations

import sys

import torch

from megatron_btm import ops
from mixing_cases import IGNORE, make_case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (atol, rtol) of the logits' gradient (written in the logits' dtype: its rounding dominates).
GRAD_TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (1e-3, 1e-2),
            torch.float16: (1e-3, 2e-3)}


def check_case(K: int, N: int, V: int, dtype: torch.dtype, extreme: bool,
               device: str = "cuda") -> None:
    """mix_nll and mix_logprobs on `device` (CUDA; the CPU runs the same check, which tests
    the check), forward and backward, against the fp64 CPU reference."""
    logits, lw, targets = make_case(K, N, V, dtype=dtype, extreme=extreme)
    lw = lw.float()
    gatol, grtol = GRAD_TOL[dtype]
    if extreme:
        gatol = max(gatol, 1e-3)  # fp32 conditioning at |L| ~ 1e4 (see test_mixing_op)
    L = logits.to(device, copy=True).requires_grad_(True)
    w = lw.to(device, copy=True).requires_grad_(True)
    nll, ell = ops.mix_nll(L, w, targets.to(device), ignore_index=IGNORE)
    rL = logits.double().requires_grad_(True)
    rw = lw.double().requires_grad_(True)
    rnll, rell = ops.reference.mix_nll(rL, rw, targets, IGNORE)
    # __expf/__logf (fast math) are ~2 ulp near 0: outputs to 1e-5 relative.
    torch.testing.assert_close(nll.double().cpu(), rnll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ell.double().cpu(), rell, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    w_nll = torch.rand(nll.shape, generator=g, dtype=torch.float64)
    w_ell = torch.randn(ell.shape, generator=g, dtype=torch.float64)
    ((nll.double() * w_nll.to(device)).sum() + (ell.double() * w_ell.to(device)).sum()).backward()
    ((rnll * w_nll).sum() + (rell * w_ell).sum()).backward()
    torch.testing.assert_close(L.grad.double().cpu(), rL.grad, atol=gatol, rtol=grtol)
    torch.testing.assert_close(w.grad.double().cpu(), rw.grad, atol=max(gatol, 1e-5), rtol=1e-4)

    L = logits.to(device, copy=True).requires_grad_(True)
    w = lw.to(device, copy=True).requires_grad_(True)
    out = ops.mix_logprobs(L, w)
    rL = logits.double().requires_grad_(True)
    rw = lw.double().requires_grad_(True)
    rout = ops.reference.mix_logprobs(rL, rw)
    torch.testing.assert_close(out.double().cpu(), rout, atol=1e-5, rtol=1e-5)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out.double() * wo.to(device)).sum().backward()
    (rout * wo).sum().backward()
    torch.testing.assert_close(L.grad.double().cpu(), rL.grad, atol=gatol, rtol=grtol)
    torch.testing.assert_close(w.grad.double().cpu(), rw.grad, atol=max(gatol, 1e-4), rtol=1e-4)


def _logits(K: int, N: int, V: int, dtype, offset: int, seed: int, device: str) -> torch.Tensor:
    """[K, N, V] CUDA logits starting `offset` elements into their storage (offset 1: rows are
    not 16-byte aligned, so the kernels' scalar head / tail and unaligned paths run)."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(offset + K * N * V, generator=g, dtype=torch.float64) * 4).to(dtype)
    logits = flat.to(device)[offset:].view(K, N, V)
    logits[1, 2] = float("-inf")  # an all -inf row
    return logits


def check_primitives(dtype: torch.dtype, shapes=((3, 5, 7), (3, 5, 2500), (3, 5, 4099),
                                                  (3, 5, 6283), (3, 5, 32768)),
                     device: str = "cuda") -> None:
    """stats / grad_logits / logprobs of the CUDA extension against the streaming references on
    the same (rounded) values in fp64: vocab-slice offsets, an all -inf row, a zero coefficient,
    a pruned expert, aligned and unaligned logits, vocab slices small (128-thread blocks) to
    large (512)."""
    import importlib
    ext = importlib.import_module("megatron_btm._mixing_" + ("cuda" if device == "cuda" else "cpu"))
    ref = ops.reference
    dev = device
    gatol = GRAD_TOL[dtype][0]
    for K, N, V in shapes:
        for offset in (0, 1):
            logits = _logits(K, N, V, dtype, offset, seed=V + offset, device=dev)
            cpu = logits.double().cpu()
            targets = torch.randint(0, V + 700, (N,), generator=torch.Generator().manual_seed(2))
            targets[0] = IGNORE
            for start in (0, 700):
                got = ext.stats(logits, targets.to(dev), start, IGNORE)
                want = ref.stats(cpu, targets, start, IGNORE)
                for name, a, b in zip(("max", "sumexp", "target"), got, want):
                    torch.testing.assert_close(a.double().cpu(), b, atol=1e-5, rtol=1e-5,
                                               msg=lambda m: f"{name} V={V} offset={offset}: {m}")
            row_max = cpu.amax(-1)
            shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            g = torch.Generator().manual_seed(3)
            logsum, coef = torch.rand(K, N, generator=g, dtype=torch.float64) * 3, \
                torch.randn(K, N, generator=g, dtype=torch.float64)
            coef[2, 0] = 0.0  # a zero coefficient: a zero row, logits not read
            for start in (0, 700):
                got = ext.grad_logits(logits, shift.float().to(dev), logsum.float().to(dev),
                                      coef.float().to(dev), targets.to(dev), start, IGNORE)
                assert got.dtype == dtype and got.shape == logits.shape
                want = ref.grad_logits(cpu, shift, logsum, coef, targets, start, IGNORE)
                torch.testing.assert_close(got.double().cpu(), want, atol=gatol, rtol=1e-2
                                           if dtype != torch.float32 else 1e-5,
                                           msg=lambda m: f"grad V={V} offset={offset}: {m}")
                assert torch.all(got[2, 0] == 0)
            b = torch.randn(K, N, generator=g, dtype=torch.float64)
            b[0, 1] = float("-inf")  # a pruned expert
            got = ext.logprobs(logits, (shift * 0.5).float().to(dev), b.float().to(dev))
            want = ref.logprobs(cpu, shift * 0.5, b)
            torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"logprobs V={V} offset={offset}: {m}")


def sanitize() -> None:
    """Small cases of every kernel and dtype (for compute-sanitizer memcheck)."""
    for dtype in DTYPES.values():
        check_primitives(dtype, shapes=((3, 5, 7), (3, 5, 1031)))
        check_case(3, 4, 1031, dtype, extreme=False)


def main(argv: list[str]) -> int:
    if argv[0] == "case":
        K, N, V = map(int, argv[1:4])
        check_case(K, N, V, DTYPES[argv[4]], argv[5] == "1")
    elif argv[0] == "primitives":
        check_primitives(DTYPES[argv[1]])
    elif argv[0] == "sanitize":
        sanitize()
    else:
        raise SystemExit(f"unknown check {argv[0]!r}: case | primitives | sanitize")
    torch.cuda.synchronize()
    print("cuda_checks: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
