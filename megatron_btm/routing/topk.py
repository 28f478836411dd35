"""Top-k routing: keep the k most probable experts and renormalise.

Per document: the k largest entries of the (cached) prior π. Per token: the k largest entries
of the posterior at each position. Ties are broken by torch.topk (lowest index first is not
guaranteed); pass distinct values where the choice matters.
"""
from __future__ import annotations

import torch


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"k={k!r}: must be an integer")
    if k < 1 or k > n:
        raise ValueError(f"k={k}: must satisfy 1 <= k <= n, the number of experts (n={n})")


def topk_prior(prior_K: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [k], weights [k]) of the k most probable experts, weights renormalised to sum 1.

    `prior_K` holds probabilities (non-negative, any positive sum). Indices are in decreasing
    order of probability.
    """
    if prior_K.dim() != 1:
        raise ValueError(f"prior_K: expected 1 dim [experts], got shape {tuple(prior_K.shape)}")
    _check_k(k, prior_K.numel())
    if (prior_K < 0).any() or not torch.isfinite(prior_K).all():
        raise ValueError(f"prior_K: probabilities must be finite and >= 0, got {prior_K.tolist()}")
    values, indices = torch.topk(prior_K, k)
    total = values.sum()
    if total <= 0:
        raise ValueError(f"prior_K: the top {k} experts have total probability 0")
    return indices, values / total


def topk_log_weights(log_w: torch.Tensor, k: int) -> torch.Tensor:
    """Same shape as `log_w` [..., K]: −inf outside the k largest entries of the last dim, and
    the kept entries renormalised in log space (they logsumexp to 0)."""
    if log_w.dim() < 1:
        raise ValueError("log_w: expected at least 1 dim [..., experts], got a scalar")
    _check_k(k, log_w.shape[-1])
    values, indices = torch.topk(log_w, k, dim=-1)
    kept = values - torch.logsumexp(values, dim=-1, keepdim=True)
    out = torch.full_like(log_w, float("-inf"))
    return out.scatter(-1, indices, kept)
