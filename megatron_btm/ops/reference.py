"""Pure-PyTorch implementations of the mixing op.

Two kinds of functions live here:

* `mix_nll` / `mix_logprobs`: the naive, obviously-correct expressions (log_softmax per expert,
  gather, logsumexp over experts). They materialise K×N×V and are the independent references
  for tests (call them on float64 inputs) and the "naive" column of bench/mixing.py.
* `stats` / `grad_logits` / `logprobs`: the three streaming primitives with the exact signatures
  of the compiled kernels (csrc/mixing_cpu.cpp). They are the fallback when the extension is not
  built; they loop over experts so the extra memory is N×V, not K×N×V.

Log-weights are used as given: the ensemble log-probability is log Σ_j exp(lw_j + ll_j) with no
renormalisation of lw over experts (callers pass a normalised log-posterior).
"""
from __future__ import annotations

import torch

__all__ = ["mix_nll", "mix_logprobs", "stats", "grad_logits", "logprobs", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64 (tests, gradcheck), everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mix_nll(logits_KNV: torch.Tensor, log_weights_NK: torch.Tensor, targets_N: torch.Tensor,
            ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive ensemble NLL [N] and per-expert target log-likelihoods [K, N] (0 where ignored)."""
    acc = acc_dtype(logits_KNV.dtype)
    logp_KNV = torch.log_softmax(logits_KNV.to(acc), dim=-1)
    valid_N = targets_N != ignore_index
    safe_N = torch.where(valid_N, targets_N, torch.zeros_like(targets_N))
    idx_KN1 = safe_N.view(1, -1, 1).expand(logp_KNV.shape[0], -1, 1)
    ll_KN = logp_KNV.gather(-1, idx_KN1).squeeze(-1)
    ll_KN = torch.where(valid_N.unsqueeze(0), ll_KN, torch.zeros_like(ll_KN))
    mixed_N = torch.logsumexp(log_weights_NK.to(acc) + ll_KN.t(), dim=-1)
    nll_N = torch.where(valid_N, -mixed_N, torch.zeros_like(mixed_N))
    return nll_N, ll_KN


def mix_logprobs(logits_KNV: torch.Tensor, log_weights_NK: torch.Tensor) -> torch.Tensor:
    """Naive mixed log-distribution [N, V] = logsumexp_j(lw_j + log_softmax(L_j))."""
    acc = acc_dtype(logits_KNV.dtype)
    logp_KNV = torch.log_softmax(logits_KNV.to(acc), dim=-1)
    return torch.logsumexp(log_weights_NK.to(acc).t().unsqueeze(-1) + logp_KNV, dim=0)


# ---- streaming primitives (same contract as the compiled kernels) ----

def stats(logits_KNV: torch.Tensor, targets_N: torch.Tensor, vocab_start: int,
          ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (expert, token): max over the local V slice, Σ exp(L − max), and the target logit
    when the target falls in [vocab_start, vocab_start + V) (else 0)."""
    K, N, V = logits_KNV.shape
    acc = acc_dtype(logits_KNV.dtype)
    local_N = targets_N - vocab_start
    in_slice_N = (targets_N != ignore_index) & (local_N >= 0) & (local_N < V)
    safe_N1 = torch.where(in_slice_N, local_N, torch.zeros_like(local_N)).unsqueeze(-1)
    max_KN = torch.empty(K, N, dtype=acc, device=logits_KNV.device)
    sum_KN = torch.empty_like(max_KN)
    tgt_KN = torch.empty_like(max_KN)
    for k in range(K):  # one expert at a time: N×V extra, never K×N×V
        x_NV = logits_KNV[k].to(acc)
        m_N = x_NV.amax(dim=-1)
        finite_N = torch.isfinite(m_N)
        shift_N = torch.where(finite_N, m_N, torch.zeros_like(m_N))
        max_KN[k] = m_N
        sum_KN[k] = torch.exp(x_NV - shift_N.unsqueeze(-1)).sum(-1)
        sum_KN[k] = torch.where(m_N == float("-inf"), torch.zeros_like(m_N), sum_KN[k])
        t_N = x_NV.gather(-1, safe_N1).squeeze(-1)
        tgt_KN[k] = torch.where(in_slice_N, t_N, torch.zeros_like(t_N))
    return max_KN, sum_KN, tgt_KN


def grad_logits(logits_KNV: torch.Tensor, shift_KN: torch.Tensor, logsum_KN: torch.Tensor,
                coef_KN: torch.Tensor, targets_N: torch.Tensor, vocab_start: int,
                ignore_index: int) -> torch.Tensor:
    """coef_kn · (softmax(L_kn)_v − 1[v = y_n − vocab_start]) in the logits' dtype, with
    softmax = exp((L − shift) − logsum) (shift = row max; L − shift is exact)."""
    K, N, V = logits_KNV.shape
    acc = acc_dtype(logits_KNV.dtype)
    local_N = targets_N - vocab_start
    in_slice_N = (targets_N != ignore_index) & (local_N >= 0) & (local_N < V)
    safe_N1 = torch.where(in_slice_N, local_N, torch.zeros_like(local_N)).unsqueeze(-1)
    grad_KNV = torch.empty_like(logits_KNV)
    for k in range(K):
        c_N1 = coef_KN[k].to(acc).unsqueeze(-1)
        z_NV = logits_KNV[k].to(acc) - shift_KN[k].to(acc).unsqueeze(-1)
        g_NV = c_N1 * torch.exp(z_NV - logsum_KN[k].to(acc).unsqueeze(-1))
        g_NV = torch.where(c_N1 == 0, torch.zeros_like(g_NV), g_NV)  # no 0·inf = NaN
        g_NV.scatter_add_(-1, safe_N1, -(c_N1 * in_slice_N.unsqueeze(-1).to(acc)))
        grad_KNV[k] = g_NV.to(logits_KNV.dtype)
    return grad_KNV


def logprobs(logits_KNV: torch.Tensor, shift_KN: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """log Σ_k exp(b_kn + (L_knv − shift_kn)) [N, V], expert by expert (online logsumexp)."""
    acc = acc_dtype(logits_KNV.dtype)
    K, N, V = logits_KNV.shape
    out_NV = torch.full((N, V), float("-inf"), dtype=acc, device=logits_KNV.device)
    for k in range(K):
        if bool((b_KN[k] == float("-inf")).all()):
            continue
        z_NV = logits_KNV[k].to(acc) - shift_KN[k].to(acc).unsqueeze(-1)
        out_NV = torch.logaddexp(out_NV, b_KN[k].to(acc).unsqueeze(-1) + z_NV)
    return out_NV
