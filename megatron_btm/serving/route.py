"""Route first: which k experts a document runs on.

- "prior": the top k of the domain's cached prior (the domain is known); one choice per domain.
- "prefix:P": every expert scores the first P ids of the document once (P − 1 predictions,
  experts loaded one at a time); the top k of the posterior after them
  (routing.posterior.sequence_log_posterior under the prior) continue, with the posterior then
  updated over those k only — which is the full posterior restricted to them and renormalised.
- "cluster" (generation, with a cluster router): the top k of the prompt's cluster weights
  (c-BTM); each token is then weighted by the cluster weights of the text so far over those k
  (the full cluster weights restricted to them and renormalised).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_btm.errors import ConfigError
from megatron_btm.routing.posterior import sequence_log_posterior


@dataclass(kw_only=True)
class Route:
    """How documents are routed: kind "prior", "prefix" (with `prefix` = P ids) or "cluster", and k."""

    kind: str
    topk: int
    prefix: int | None = None

    def __post_init__(self):
        if self.kind not in ("prior", "prefix", "cluster"):
            raise ConfigError(f"--route {self.kind!r}: valid routes are prior, prefix:P and cluster")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ConfigError(f"--topk {self.topk!r}: must be an integer >= 1")
        if self.kind == "prefix" and (isinstance(self.prefix, bool) or not isinstance(self.prefix, int)
                                      or self.prefix < 1):
            raise ConfigError(f"--route prefix:{self.prefix}: P must be an integer >= 1 (ids of the "
                              "document that every expert scores)")

    @classmethod
    def parse(cls, text: str, topk: int) -> "Route":
        """'prior' or 'prefix:P' (the --route option)."""
        kind, sep, p = text.partition(":")
        if kind == "prefix":
            try:
                return cls(kind="prefix", topk=topk, prefix=int(p))
            except ValueError:
                raise ConfigError(f"--route {text!r}: write prefix:P with P an integer >= 1") from None
        if sep or kind not in ("prior", "cluster"):
            raise ConfigError(f"--route {text!r}: valid routes are prior, prefix:P and cluster")
        return cls(kind=kind, topk=topk)

    def check(self, num_experts: int) -> None:
        if self.topk > num_experts:
            raise ConfigError(f"--topk {self.topk}: larger than the forest ({num_experts} experts)")

    def label(self) -> str:
        return f"prefix:{self.prefix}" if self.kind == "prefix" else self.kind


def log_prior_or_uniform(prior_K: torch.Tensor | None, num_experts: int, where: str = "prior") -> torch.Tensor:
    """[K] float64 log prior (uniform for None); a prior of another forest's size is refused."""
    if prior_K is None:
        return torch.full((num_experts,), -float(torch.log(torch.tensor(float(num_experts)))),
                          dtype=torch.float64)
    prior_K = torch.as_tensor(prior_K, dtype=torch.float64)
    if prior_K.shape != (num_experts,):
        raise ConfigError(f"{where}: {prior_K.numel()} values but the forest has {num_experts} "
                          "experts (a prior of another forest?)")
    return prior_K.log()


def topk_rows(log_post_BK: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] indices of the k most probable experts per row, most probable first."""
    return torch.topk(log_post_BK, k, dim=-1).indices


def prefix_scores(pool, prefix_BP: torch.Tensor) -> torch.Tensor:
    """[B, P − 1, n] float64 log-likelihoods every expert of `pool` gives the prefix ids
    (0 where IGNORE), experts loaded one at a time."""
    from megatron_btm.inference.scoring import score_blocks
    B, P = prefix_BP.shape
    if P < 2:
        return torch.zeros(B, 0, len(pool), dtype=torch.float64)
    return torch.stack([score_blocks(pool.get([i])[0], prefix_BP) for i in pool.ids], dim=-1)


def route_prefix(pool, prefix_BP: torch.Tensor, k: int, log_prior_K: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B, k] expert indices, prefix log-likelihoods [B, P − 1, n])."""
    ll_BPK = prefix_scores(pool, prefix_BP)
    return topk_rows(sequence_log_posterior(ll_BPK, log_prior_K), k), ll_BPK
