"""Cluster routing (c-BTM): expert weights from the prefix's distance to the cluster centroids.

    h = e(x_<t)                          tf-idf -> SVD -> L2 embedding of the prefix text
    d_j = ||h - c_j||^2                  squared Euclidean distance to centroid j
    w_j ∝ exp(-d_j / T)                  T = 0.1 by default; then keep the top k, renormalise

This is the paper's form (exp(-dist(h, c_j)^2 / T)). c-BTM's released code squares the already
squared distance (exp(-d_j^2 / T)); we do not. A prefix with no vocabulary word embeds to the
zero vector, so d_j = ||c_j||^2: the formula is applied as is (no special case).

c-BTM re-vectorises every prefix from scratch. Here the prefix state keeps the word counts of
the complete words seen so far plus the trailing partial word; appending text adds counts, and
the embedding (counts -> projection -> L2) equals the from-scratch embedding of the whole text.

Library API (for eval / generate / branch):
    router = ClusterRouter.load("CLUSTERS", temperature=0.1)
    w_K = router.weights(text, topk=2)          # torch float64 [K], zeros outside the top k
    state = router.incremental(); state.append(piece); w_K = state.weights(topk=2)
    w_K = domain_branch_weights(router, docs)   # a new domain's branch weights (mean over docs)
The order of the K weights is `router.names` (the cluster names = the experts' domains).
`append` takes text: with a byte-level BPE, decode the token prefix and append what is new
(one token can end inside a UTF-8 character, so do not decode tokens one by one).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Iterable

import numpy as np
import torch

from megatron_btm.cluster.artefact import ClusterModel, load_clusters
from megatron_btm.cluster.text import split_complete
from megatron_btm.routing import DEFAULT_TEMPERATURE
from megatron_btm.routing.topk import topk_log_weights


def cluster_log_weights(sq_dist_K: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                        topk: int | None = None) -> torch.Tensor:
    """[..., K] log w: log_softmax(-d / T), then top-k renormalised (-inf outside) if topk."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number > 0")
    logits = -torch.as_tensor(sq_dist_K, dtype=torch.float64) / temperature
    log_w = torch.log_softmax(logits, dim=-1)
    return topk_log_weights(log_w, topk) if topk is not None else log_w


class ClusterRouter:
    """Routes text to the clusters of a `btm cluster fit` artefact."""

    def __init__(self, model: ClusterModel, temperature: float = DEFAULT_TEMPERATURE):
        cluster_log_weights(torch.zeros(1), temperature)  # validates the temperature
        self.model, self.temperature = model, float(temperature)

    @classmethod
    def load(cls, path: str | os.PathLike, temperature: float = DEFAULT_TEMPERATURE) -> "ClusterRouter":
        return cls(load_clusters(path), temperature)

    @property
    def names(self) -> list[str]:
        return self.model.names

    @property
    def num_clusters(self) -> int:
        return self.model.k

    def embed(self, text: str) -> np.ndarray:
        """[dim] embedding of `text` from scratch."""
        return self.model.featurizer.embed([text])[0]

    def weights_from_embedding(self, emb: np.ndarray, topk: int | None = None) -> torch.Tensor:
        """[K] (or [N, K] for [N, dim]) float64 weights summing to 1."""
        emb = np.asarray(emb, dtype=np.float64)
        d = torch.from_numpy(self.model.distances(emb.reshape(-1, emb.shape[-1])))
        w = cluster_log_weights(d, self.temperature, topk).exp()
        return w[0] if emb.ndim == 1 else w

    def weights(self, text: str, topk: int | None = None) -> torch.Tensor:
        """[K] weights of the experts for a prefix `text`."""
        return self.weights_from_embedding(self.embed(text), topk)

    def incremental(self) -> "PrefixState":
        """A prefix state: append text as it arrives, ask for weights at any point."""
        return PrefixState(self)

    def subset(self, names: list[str]) -> "ClusterRouter":
        """The router over the clusters `names` only, in that order (same vectoriser, same T):
        its softmax is the full one restricted to them and renormalised."""
        index = {n: j for j, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"clusters {missing} are not in the artefact (clusters: {self.names})")
        model = ClusterModel(featurizer=self.model.featurizer, names=list(names),
                             centroids=self.model.centroids[[index[n] for n in names]],
                             meta=self.model.meta)
        return ClusterRouter(model, self.temperature)

    def for_experts(self, expert_ids: list[str], where: str = "--clusters", *,
                    partial: bool = False) -> "ClusterRouter":
        """The router whose weights are in the order of `expert_ids`. The rule: a forest expert
        routes through the cluster of the same name (`btm cluster assign` names the domains
        after the clusters, and the experts trained on them keep the domain's name), and the
        two sets must be equal: a cluster without an expert, or an expert without a cluster,
        is a one-line error (a forest of other domains, or a partial forest). `partial`
        (branching, where later clusters have no expert yet): clusters without an expert are
        left out, every expert still needs its cluster."""
        no_expert = [n for n in self.names if n not in set(expert_ids)]
        no_cluster = [e for e in expert_ids if e not in set(self.names)]
        if no_expert and not partial:
            raise ValueError(f"{where}: cluster(s) {no_expert[:5]} have no expert of that id in the "
                             f"forest (experts: {list(expert_ids)[:8]}); the forest's expert ids "
                             "must be the cluster names")
        if no_cluster:
            raise ValueError(f"{where}: forest expert(s) {no_cluster[:5]} have no cluster of that "
                             f"name (clusters: {self.names[:8]}); the forest's expert ids must be "
                             "the cluster names")
        return self.subset(list(expert_ids))


class PrefixState:
    """Word counts of a growing prefix; `embedding()` equals `router.embed(all text so far)`."""

    def __init__(self, router: ClusterRouter):
        self.router = router
        self.counts: Counter[int] = Counter()  # vocabulary id -> count, complete words only
        self.pending = ""  # trailing word characters that more text may extend

    def append(self, text: str) -> "PrefixState":
        complete, self.pending = split_complete(self.pending + text)
        if complete:
            self.counts.update(self.router.model.featurizer.word_ids(complete))
        return self

    def _current_counts(self) -> Counter[int]:
        if not self.pending:
            return self.counts
        return self.counts + Counter(self.router.model.featurizer.word_ids(self.pending))

    def embedding(self) -> np.ndarray:
        return self.router.model.featurizer.embed_count_dict(self._current_counts())

    def weights(self, topk: int | None = None) -> torch.Tensor:
        return self.router.weights_from_embedding(self.embedding(), topk)


def domain_branch_weights(router: ClusterRouter, texts: Iterable[str], topk: int | None = None,
                          batch_size: int = 1024) -> torch.Tensor:
    """[K] weights for branching a new domain: the mean of its documents' cluster weights.

    Each document's weights use the same formula as routing (top-k renormalised if `topk`);
    the mean is a probability vector over `router.names`.
    """
    total, n = torch.zeros(router.num_clusters, dtype=torch.float64), 0
    buf: list[str] = []

    def flush():
        nonlocal total, n
        emb = router.model.featurizer.embed(buf)
        total = total + router.weights_from_embedding(emb, topk).sum(dim=0)
        n += len(buf)
        buf.clear()
    for text in texts:
        buf.append(text)
        if len(buf) == batch_size:
            flush()
    if buf:
        flush()
    if n == 0:
        raise ValueError("domain_branch_weights: no documents given")
    return total / n
