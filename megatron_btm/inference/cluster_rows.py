"""The cluster-routing rows of `btm eval` (c-BTM): ensemble/cluster and top<k>/cluster.

At each position t of a block the weights are the cluster router's for the text of ids 0..t
(routing.cluster_tokens: the prefix embedding updated token by token), in the forest's expert
order (`ClusterRouter.for_experts`: expert id == cluster name); the NLL at t is
−log Σ_j w_tj p_j(x_{t+1}). Unlike the posterior rows, the weights do not depend on the
experts' likelihoods, only on the text.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_btm.inference.ensemble import _cell, mix_ll
from megatron_btm.inference.rows import ENSEMBLE_CLUSTER, topk_row
from megatron_btm.routing.cluster import cluster_log_weights
from megatron_btm.routing.cluster_tokens import block_embeddings


def cluster_rows(ll_NTK: torch.Tensor, valid_NT: torch.Tensor, blocks_NT1: torch.Tensor,
                 router, tokenizer, topk: Sequence[int]) -> tuple[dict[str, dict], list[float]]:
    """(rows {ensemble/cluster, top<k>/cluster for k <= K}, mean weights [K] over the scored
    positions) of one domain; `router` is already in the experts' order."""
    N, T, K = ll_NTK.shape
    if router.num_clusters != K:
        raise ValueError(f"cluster router over {router.num_clusters} clusters for {K} experts")
    emb = block_embeddings(router, tokenizer, blocks_NT1)
    d_NTK = torch.from_numpy(router.model.distances(emb.reshape(N * T, -1))).reshape(N, T, K)
    ll_NTK = torch.where(valid_NT.unsqueeze(-1), ll_NTK.double(), torch.zeros((), dtype=torch.float64))
    tokens = int(valid_NT.sum())
    rows: dict[str, dict] = {}
    mean_w: list[float] = []
    for k in [None] + [k for k in topk if k <= K]:
        log_w = cluster_log_weights(d_NTK, router.temperature, k)
        nll = float(mix_ll(log_w, ll_NTK, valid_NT).sum())
        rows[ENSEMBLE_CLUSTER if k is None else topk_row(k, "cluster")] = _cell(nll, tokens)
        if k is None:
            mean_w = (log_w.exp() * valid_NT.unsqueeze(-1)).sum((0, 1)).div(max(tokens, 1)).tolist()
    return rows, mean_w
