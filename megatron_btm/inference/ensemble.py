"""Ensemble scoring of an ELMForest (DESIGN.md "The math"): pure tensor math.

Per block, experts j = 1..K give token log-likelihoods ll_j(t) = log p_j(x_t | x_<t). The
mixture weights at position t are
- updating: the domain posterior p(D=j | x_<t) over the block's prefix (`prefix_log_posterior`;
  at t = 0 it is the prior) — the paper's ELMForest ensemble with a cached prior;
- fixed: the prior itself at every position;
then top-k per document (keep the k largest prior entries, renormalise) or per token (the k
largest posterior entries at each position, renormalised). The ensemble NLL at t is
−log Σ_j w_tj p_j(x_t), computed in log space.

Two entry points that agree exactly:
- `ensemble_nll_from_logits`: from the experts' logits, through the fused op `ops.mix_nll`
  (first pass: per-expert log-likelihoods → posterior; second pass: the weighted mixture);
- `ensemble_nll_from_ll`: from precomputed log-likelihoods (the evaluator computes them once per
  expert and reuses them for every row), mixing with the same log-space formula.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from megatron_btm.inference.rows import ensemble_row, expert_row, topk_row
from megatron_btm.routing.posterior import prefix_log_posterior
from megatron_btm.routing.topk import topk_log_weights, topk_prior

# row family -> (which prior, posterior updating?)
MODES: dict[str, tuple[str, bool]] = {
    "uniform": ("uniform", True),
    "cached": ("cached", True),
    "uniform-fixed": ("uniform", False),
    "cached-fixed": ("cached", False),
}
DEFAULT_MODES = ("uniform", "cached")


def check_modes(modes: Sequence[str]) -> list[str]:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown ensemble mode(s) {unknown}; valid modes: {list(MODES)}")
    return list(modes)


def log_prior_of(prior_K: torch.Tensor | None, num_experts: int, *, topk: int | None = None) -> torch.Tensor:
    """[K] float64 log prior: uniform when `prior_K` is None; with `topk`, −inf outside the k
    most probable experts and the kept ones renormalised (top-k per document)."""
    if prior_K is None:
        prior_K = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    prior_K = torch.as_tensor(prior_K, dtype=torch.float64)
    if prior_K.shape != (num_experts,):
        raise ValueError(f"prior: expected {num_experts} values (one per expert), got shape "
                         f"{tuple(prior_K.shape)}")
    if topk is None:
        if (prior_K < 0).any() or not torch.isfinite(prior_K).all() or prior_K.sum() <= 0:
            raise ValueError(f"prior: must be finite, >= 0 and not all 0, got {prior_K.tolist()}")
        return (prior_K / prior_K.sum()).log()
    indices, weights = topk_prior(prior_K, topk)
    out = torch.full((num_experts,), float("-inf"), dtype=torch.float64)
    return out.index_copy(0, indices, weights.log())


def mixture_log_weights(expert_ll_BTK: torch.Tensor, log_prior_K: torch.Tensor, *,
                        update: bool = True, topk_token: int | None = None,
                        window: int | None = None, decay: float | None = None) -> torch.Tensor:
    """[B, T, K] float64 log mixture weights at each position (see the module docstring).
    `expert_ll_BTK` must hold 0 at ignored positions (no evidence)."""
    B, T, K = expert_ll_BTK.shape
    if update:
        log_w_BTK = prefix_log_posterior(expert_ll_BTK.double(), log_prior_K.double(),
                                         window=window, decay=decay)
    else:
        lp = log_prior_K.double()
        log_w_BTK = (lp - torch.logsumexp(lp, dim=-1)).expand(B, T, K)
    if topk_token is not None:
        log_w_BTK = topk_log_weights(log_w_BTK, topk_token)
    return log_w_BTK


def mix_ll(log_w_BTK: torch.Tensor, expert_ll_BTK: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] ensemble NLL −logsumexp_j(log w_tj + ll_j(t)), 0 at invalid positions.
    The same combination `ops.mix_nll` applies after its pass over the logits."""
    mixed_BT = torch.logsumexp(log_w_BTK.double() + expert_ll_BTK.double(), dim=-1)
    return torch.where(valid_BT, -mixed_BT, torch.zeros_like(mixed_BT))


def ensemble_nll_from_ll(expert_ll_BTK: torch.Tensor, valid_BT: torch.Tensor,
                         log_prior_K: torch.Tensor, *, update: bool = True,
                         topk_token: int | None = None, window: int | None = None,
                         decay: float | None = None) -> torch.Tensor:
    """[B, T] float64 ensemble NLL from per-expert token log-likelihoods [B, T, K]."""
    ll_BTK = torch.where(valid_BT.unsqueeze(-1), expert_ll_BTK.double(),
                         torch.zeros((), dtype=torch.float64))
    log_w_BTK = mixture_log_weights(ll_BTK, log_prior_K, update=update, topk_token=topk_token,
                                    window=window, decay=decay)
    return mix_ll(log_w_BTK, ll_BTK, valid_BT)


def ensemble_nll_from_logits(logits_KBTV: torch.Tensor, targets_BT: torch.Tensor,
                             log_prior_K: torch.Tensor, *, update: bool = True,
                             topk_token: int | None = None, ignore_index: int = -100,
                             tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [B, T], expert_ll [B, T, K]) from all experts' logits [K, B, T, V] (this TP rank's
    vocab slice with tp_group), through `ops.mix_nll`; 0 where targets == ignore_index."""
    from megatron_btm.ops import mix_nll
    K, B, T, V = logits_KBTV.shape
    logits_KNV = logits_KBTV.reshape(K, B * T, V)
    targets_N = targets_BT.reshape(-1)
    # One pass over the logits: per-expert log-likelihoods (weights do not affect them).
    dev = logits_KBTV.device
    targets_N = targets_N.to(dev)
    uniform_NK = torch.full((B * T, K), -math.log(K), dtype=torch.float32, device=dev)
    _, ll_KN = mix_nll(logits_KNV, uniform_NK, targets_N, ignore_index=ignore_index, tp_group=tp_group)
    ll_BTK = ll_KN.t().reshape(B, T, K).double()
    log_w_BTK = mixture_log_weights(ll_BTK, log_prior_K.to(dev), update=update, topk_token=topk_token)
    # The mixture under those weights is O(K·N) from ll_BTK (what mix_nll would compute again
    # with a second pass over the logits).
    valid_BT = targets_BT.to(dev) != ignore_index
    return mix_ll(log_w_BTK, ll_BTK, valid_BT), ll_BTK


def _cell(nll_sum: float, tokens: int) -> dict[str, float | int]:
    nll = nll_sum / max(tokens, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": tokens}


def evaluate_rows(expert_ll_NTK: torch.Tensor, valid_NT: torch.Tensor, expert_names: Sequence[str], *,
                  prior_K: torch.Tensor | None = None, modes: Sequence[str] = DEFAULT_MODES,
                  topk: Sequence[int] = (1, 2), single_experts: bool = True,
                  window: int | None = None, decay: float | None = None) -> dict[str, dict]:
    """Every row of one domain's table from the experts' log-likelihoods on its blocks.

    Rows: `expert/<name>` (each expert alone), `ensemble/<mode>` for each mode (modes needing
    the cached prior are skipped when `prior_K` is None), `top<k>/doc` (top-k of the cached
    prior, posterior updating among them; needs `prior_K`) and `top<k>/token` (top-k of the
    posterior under the cached prior, or the uniform one without a prior), for k <= K.
    Cell: {"nll": mean NLL per scored token (nats), "ppl": exp(nll), "tokens": scored tokens}.
    """
    N, T, K = expert_ll_NTK.shape
    if len(expert_names) != K:
        raise ValueError(f"expert_names: {len(expert_names)} names for {K} experts")
    for k in topk:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"topk={list(topk)}: each k must be a positive integer")
    check_modes(modes)
    tokens = int(valid_NT.sum())
    ll_NTK = torch.where(valid_NT.unsqueeze(-1), expert_ll_NTK.double(),
                         torch.zeros((), dtype=torch.float64))
    rows: dict[str, dict] = {}
    if single_experts:
        for j, name in enumerate(expert_names):
            rows[expert_row(name)] = _cell(float(-ll_NTK[..., j].sum()), tokens)

    def add(row: str, log_prior: torch.Tensor, update: bool, topk_token: int | None = None):
        nll_NT = ensemble_nll_from_ll(ll_NTK, valid_NT, log_prior, update=update,
                                      topk_token=topk_token, window=window, decay=decay)
        rows[row] = _cell(float(nll_NT.sum()), tokens)

    for mode in modes:
        which, update = MODES[mode]
        if which == "cached" and prior_K is None:
            continue
        add(ensemble_row(mode), log_prior_of(prior_K if which == "cached" else None, K), update)
    for k in topk:
        if k > K:
            continue
        if prior_K is not None:
            add(topk_row(k, "doc"), log_prior_of(prior_K, K, topk=k), True)
        add(topk_row(k, "token"), log_prior_of(prior_K, K), True, topk_token=k)
    return rows


def single_model_row(ll_NT: torch.Tensor, valid_NT: torch.Tensor) -> dict[str, float | int]:
    """Cell of one model (e.g. an averaged checkpoint) from its token log-likelihoods."""
    return _cell(float(-torch.where(valid_NT, ll_NT.double(), torch.zeros((), dtype=torch.float64)).sum()),
                 int(valid_NT.sum()))
