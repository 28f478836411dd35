"""Cached domain prior (DEMix): estimate π for a target domain on held-out text, then freeze it.

EMA convention (exact): starting from π⁽⁰⁾ (uniform unless `initial` is given), for batch
i = 1, 2, ... with per-sequence posteriors q_b = p(D | x_b) computed under the *current* prior
π⁽ⁱ⁻¹⁾ (the "updating posterior"):

    π⁽ⁱ⁾ = (1 − α) · π⁽ⁱ⁻¹⁾ + α · mean_b q_b        (α = 0.3 by default)

q_b is the posterior after the whole sequence b — all of its tokens (`lengths` trims padding),
i.e. the posterior at the last token once that token has been scored. π stays a probability
vector (a convex combination of probability vectors); we renormalise only against rounding.

The per-expert log-likelihoods do not depend on π, so callers compute them once (one forward
per expert) and pass them here; only this cheap recurrence depends on the order of batches.
"""
from __future__ import annotations

import datetime
import math
import os
from typing import Any, Iterable, Sequence

import torch

from megatron_btm.routing.posterior import sequence_log_posterior
from megatron_btm.utils.io import atomic_write_json, read_json

PRIOR_FORMAT = "btm-prior"
PRIOR_VERSION = 1
DEFAULT_ALPHA = 0.3


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha={alpha!r}: the EMA rate must be in (0, 1]")


def ema_update(prior_K: torch.Tensor, batch_last_posterior_BK: torch.Tensor, alpha: float) -> torch.Tensor:
    """π ← (1 − α)·π + α·mean_b(posterior_b). Both inputs are probabilities (not logs)."""
    _check_alpha(alpha)
    if batch_last_posterior_BK.dim() != 2 or batch_last_posterior_BK.shape[1] != prior_K.shape[0]:
        raise ValueError(f"batch_last_posterior_BK: expected shape [batch, {prior_K.shape[0]}], "
                         f"got {tuple(batch_last_posterior_BK.shape)}")
    new = (1.0 - alpha) * prior_K + alpha * batch_last_posterior_BK.to(prior_K.dtype).mean(dim=0)
    return new / new.sum()


def estimate_cached_prior(expert_ll_batches: Iterable[torch.Tensor], num_experts: int, *,
                          alpha: float = DEFAULT_ALPHA, initial: torch.Tensor | None = None,
                          lengths: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
    """Run the EMA above over batches of per-expert token log-likelihoods; return π [K] (float64).

    Args:
      expert_ll_batches: iterable of [B, T, K] tensors, [b, t, j] = log p_j(x_t | x_<t).
      num_experts: K (checked against every batch).
      alpha: EMA rate in (0, 1].
      initial: starting π [K] (probabilities); None = uniform.
      lengths: optional iterable of [B] valid lengths, one per batch (same order).
    """
    _check_alpha(alpha)
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: must be >= 1")
    if initial is None:
        prior = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    else:
        prior = torch.as_tensor(initial, dtype=torch.float64).clone()
        if prior.shape != (num_experts,) or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError(f"initial: expected {num_experts} non-negative probabilities, got "
                             f"{prior.tolist()}")
        prior = prior / prior.sum()
    length_iter = iter(lengths) if lengths is not None else None
    num_batches = 0
    for i, ll_BTK in enumerate(expert_ll_batches):
        if ll_BTK.dim() != 3 or ll_BTK.shape[-1] != num_experts:
            raise ValueError(f"expert_ll_batches[{i}]: expected shape [batch, time, {num_experts}], "
                             f"got {tuple(ll_BTK.shape)}")
        lengths_B = None
        if length_iter is not None:
            try:
                lengths_B = next(length_iter)
            except StopIteration:
                raise ValueError(f"lengths: ran out at batch {i}; give one [B] tensor per batch") from None
        log_post_BK = sequence_log_posterior(ll_BTK, prior.log(), lengths_B)
        prior = ema_update(prior, log_post_BK.exp(), alpha)
        num_batches += 1
    if num_batches == 0:
        raise ValueError("expert_ll_batches: empty; the prior needs at least one batch of held-out text")
    return prior


def save_prior(path: str | os.PathLike, prior_K: torch.Tensor, expert_ids: Sequence[str],
               domain: str, meta: dict[str, Any] | None = None) -> None:
    """Write the prior as JSON (atomic): {format, version, domain, expert_ids, prior, meta}."""
    values = [float(v) for v in torch.as_tensor(prior_K, dtype=torch.float64).tolist()]
    if len(values) != len(expert_ids):
        raise ValueError(f"save_prior: {len(values)} prior values but {len(expert_ids)} expert ids")
    if len(set(expert_ids)) != len(expert_ids):
        raise ValueError(f"save_prior: duplicate expert ids in {list(expert_ids)}")
    _check_probabilities(values, str(path))
    atomic_write_json(path, {
        "format": PRIOR_FORMAT, "version": PRIOR_VERSION, "domain": domain,
        "expert_ids": list(expert_ids), "prior": values, "meta": dict(meta or {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def _check_probabilities(values: Sequence[float], where: str) -> None:
    bad = [i for i, v in enumerate(values) if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"{where}: prior[{bad[0]}]={values[bad[0]]!r} is not a finite probability >= 0")
    total = sum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where}: prior sums to {total!r}, expected 1 (±1e-6)")


def load_prior(path: str | os.PathLike, expert_ids: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """Read a prior JSON; return (prior_K float64, expert_ids, meta).

    With `expert_ids` (the forest's experts), the file must cover exactly those ids; the prior
    is returned in that order. Otherwise a ValueError names the missing and the extra ids.
    """
    data = read_json(path)
    where = str(path)
    if not isinstance(data, dict) or data.get("format") != PRIOR_FORMAT:
        raise ValueError(f"{where}: not a prior file (expected \"format\": \"{PRIOR_FORMAT}\")")
    for key in ("expert_ids", "prior"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{where}: key {key!r} missing or not a list")
    ids, values = [str(i) for i in data["expert_ids"]], data["prior"]
    if len(ids) != len(values):
        raise ValueError(f"{where}: {len(ids)} expert_ids but {len(values)} prior values")
    if not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{where}: key 'prior' must hold numbers")
    _check_probabilities(values, where)
    meta = dict(data.get("meta") or {}, domain=data.get("domain"))
    prior = torch.tensor(values, dtype=torch.float64)
    if expert_ids is not None:
        want = [str(i) for i in expert_ids]
        missing, extra = sorted(set(want) - set(ids)), sorted(set(ids) - set(want))
        if missing or extra:
            raise ValueError(f"{where}: expert ids do not match the forest's: missing from the "
                             f"prior {missing}, not in the forest {extra} (re-estimate the prior)")
        order = [ids.index(i) for i in want]
        prior, ids = prior[order], want
    return prior, ids, meta
