"""Domain posterior over the prefix (DEMix / BTM, DESIGN.md "The math").

    log p(D=j | x_<t) = log π_j + Σ_{s<t} log p_j(x_s | x_<s) − logsumexp_j'(same)

At the first position (t = 0 here, 0-based) the sum is empty and the posterior is the prior.
The official BTM code used only the previous token's likelihood; we use the whole prefix (the
paper's formula) by default, with two options that forget old evidence:

- ``window=W``: only the last W positions before t count (s in [t−W, t−1]).
- ``decay=γ`` (0 < γ ≤ 1): position s counts with weight γ^(t−1−s); γ = 1 is the whole prefix.

Positions to ignore (padding, document separators) are handled by the caller passing 0 as
their log-likelihood for every expert: a 0 adds the same amount to every expert's score, which
the normalisation cancels, so such a position carries no evidence.
"""
from __future__ import annotations

import torch


def _check_inputs(expert_ll_BTK: torch.Tensor, log_prior: torch.Tensor) -> None:
    if expert_ll_BTK.dim() != 3:
        raise ValueError(f"expert_ll_BTK: expected 3 dims [batch, time, experts], got shape "
                         f"{tuple(expert_ll_BTK.shape)}")
    B, _, K = expert_ll_BTK.shape
    if log_prior.shape not in ((K,), (B, K)):
        raise ValueError(f"log_prior: expected shape ({K},) or ({B}, {K}) to match expert_ll_BTK "
                         f"{tuple(expert_ll_BTK.shape)}, got {tuple(log_prior.shape)}")
    if torch.isnan(log_prior).any() or (log_prior == float("inf")).any():
        raise ValueError("log_prior: contains NaN or +inf")
    if torch.isneginf(log_prior).all(dim=-1).any():
        raise ValueError("log_prior: every expert has probability 0 (all -inf) in some row")


def _evidence_before_t(ll_BTK: torch.Tensor, window: int | None, decay: float | None) -> torch.Tensor:
    """E[b, t, j] = Σ_{s<t} w(t, s) · ll[b, s, j] (float64), with w from window/decay."""
    B, T, K = ll_BTK.shape
    zero = ll_BTK.new_zeros(B, 1, K)
    if decay is not None and decay != 1.0:
        # Recurrence E_t = γ·E_{t−1} + ll_{t−1}: stable for any T (the closed form γ^(t−1)·Σγ^(−s)
        # over/underflows for long sequences). T steps over [B, K] tensors: cheap next to an LM.
        out = [zero[:, 0]]
        for t in range(1, T):
            out.append(decay * out[-1] + ll_BTK[:, t - 1])
        return torch.stack(out, dim=1)
    # Exclusive cumulative sum: S[:, t] = Σ_{s<t} ll[:, s]   (S has T+1 entries, S[:, 0] = 0)
    S = torch.cat([zero, ll_BTK.cumsum(dim=1)], dim=1)  # [B, T+1, K]
    if window is None:
        return S[:, :T]
    # Σ_{s=max(0,t−W)}^{t−1} ll_s = S_t − S_{max(0, t−W)}   (float64 keeps the difference exact
    # enough even after thousands of tokens of −3 nats each)
    t = torch.arange(T, device=ll_BTK.device)
    start = (t - window).clamp(min=0)
    return S[:, :T] - S[:, start]


def prefix_log_posterior(expert_ll_BTK: torch.Tensor, log_prior: torch.Tensor, *,
                         window: int | None = None, decay: float | None = None) -> torch.Tensor:
    """Log domain posterior at every position, from per-expert token log-likelihoods.

    Args:
      expert_ll_BTK: [B, T, K], entry [b, t, j] = log p_j(x_t | x_<t), the log-likelihood
        expert j gave the token at position t. Use 0 for positions that should carry no
        evidence (padding).
      log_prior: [K] or [B, K] log prior (normalised or not: the result is normalised; −inf
        excludes an expert, e.g. a top-k prior).
      window: count only the last `window` positions before t (positive int), or None.
      decay: weight γ^(t−1−s) on position s, γ in (0, 1], or None. Not with `window`.

    Returns:
      [B, T, K] log p(D=j | x_<t): position t uses positions < t only; at t = 0 it is the
      (normalised) prior. dtype: the input's if floating point of ≥32 bits, else float32;
      computed in float64.
    """
    if window is not None and decay is not None:
        raise ValueError(f"window={window} and decay={decay}: choose one way of forgetting, not both")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r}: must be a positive integer (number of tokens) or None")
    if decay is not None and not (0.0 < decay <= 1.0):
        raise ValueError(f"decay={decay!r}: must be in (0, 1] or None")
    _check_inputs(expert_ll_BTK, log_prior)
    out_dtype = expert_ll_BTK.dtype if expert_ll_BTK.dtype in (torch.float32, torch.float64) \
        else torch.float32
    ll = expert_ll_BTK.to(torch.float64)
    evidence_BTK = _evidence_before_t(ll, window, decay)
    prior = log_prior.to(torch.float64)
    prior_B1K = prior.view(1, 1, -1) if prior.dim() == 1 else prior.unsqueeze(1)
    score_BTK = prior_B1K + evidence_BTK
    return (score_BTK - torch.logsumexp(score_BTK, dim=-1, keepdim=True)).to(out_dtype)


def sequence_log_posterior(expert_ll_BTK: torch.Tensor, log_prior: torch.Tensor,
                           lengths_B: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K] log p(D=j | x_1..x_L): the posterior after the whole sequence (all L tokens).

    `lengths_B` (optional) gives each row's number of valid positions; later positions are
    ignored. This is the "posterior at the last token" the cached prior averages.
    """
    _check_inputs(expert_ll_BTK, log_prior)
    B, T, _ = expert_ll_BTK.shape
    ll = expert_ll_BTK.to(torch.float64)
    if lengths_B is not None:
        lengths_B = torch.as_tensor(lengths_B, device=ll.device)
        if lengths_B.shape != (B,) or (lengths_B < 0).any() or (lengths_B > T).any():
            raise ValueError(f"lengths: expected {B} values in [0, {T}], got "
                             f"{lengths_B.tolist() if lengths_B.numel() < 20 else lengths_B.shape}")
        valid_BT = torch.arange(T, device=ll.device).unsqueeze(0) < lengths_B.unsqueeze(1)
        ll = torch.where(valid_BT.unsqueeze(-1), ll, torch.zeros((), dtype=ll.dtype))
    prior = log_prior.to(torch.float64)
    score_BK = (prior if prior.dim() == 2 else prior.unsqueeze(0)) + ll.sum(dim=1)
    return score_BK - torch.logsumexp(score_BK, dim=-1, keepdim=True)
