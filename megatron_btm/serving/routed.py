"""Route first, then run only the chosen experts: perplexity and generation, with their cost.

Cost is counted, not estimated: `expert_forwards_per_token` = positions fed through any expert
(prefix scoring by all n, then the k chosen) / tokens scored (evaluation) or generated
(generation); `seconds` is wall time, `ms_per_token` its ratio to those tokens.

Evaluation (`evaluate_routed`): a block is a document. "prior": the k experts of the domain's
prior score every block, the posterior updating over them. "prefix:P": all n experts score the
first P ids of every block; positions inside the prefix are scored by the whole ensemble (all n
are there); after it, the top k of the posterior continue, their posterior updating. k = n is the
full ensemble (`ensemble/cached`, or `ensemble/uniform` without a prior).
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import torch

from megatron_btm.errors import ConfigError
from megatron_btm.inference.ensemble import mix_ll
from megatron_btm.inference.scoring import IGNORE, score_blocks
from megatron_btm.routing.posterior import prefix_log_posterior
from megatron_btm.serving.route import Route, log_prior_or_uniform, route_prefix, topk_rows


def _chosen_ll(pool, blocks_NT1: torch.Tensor, chosen_Nk: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[N, T, k] log-likelihoods of each block under its own chosen experts (one model at a time)."""
    N, k = chosen_Nk.shape
    out = torch.zeros(N, blocks_NT1.shape[1] - 1, k, dtype=torch.float64)
    for j in sorted(set(chosen_Nk.flatten().tolist())):
        rows, slots = (chosen_Nk == j).nonzero(as_tuple=True)
        ll = score_blocks(pool.get([pool.ids[j]])[0], blocks_NT1[rows], batch_size=batch_size)
        out[rows, :, slots] = ll
    return out


def evaluate_block_set(pool, blocks_NT1: torch.Tensor, route: Route, prior_K: torch.Tensor | None,
                       *, batch_size: int = 8) -> dict:
    """{"nll", "ppl", "tokens", "expert_forwards_per_token", "seconds", "ms_per_token",
    "chosen": [[expert ids] per block]} of routed evaluation over blocks [N, T+1]."""
    n, k = len(pool), route.topk
    route.check(n)
    if route.kind == "prior" and prior_K is None:
        raise ConfigError("--route prior: needs the domain's cached prior (--priors DIR)")
    log_prior = log_prior_or_uniform(prior_K, n)
    N, T1 = blocks_NT1.shape
    valid_NT = blocks_NT1[:, 1:] != IGNORE
    tokens = int(valid_NT.sum())
    start = time.perf_counter()
    positions = 0
    if route.kind == "prior":
        chosen_Nk = topk_rows(log_prior.unsqueeze(0), k).expand(N, k)
        split = 0
        ll_pre = torch.zeros(N, 0, n, dtype=torch.float64)
    else:
        if route.prefix > T1:
            raise ConfigError(f"--route prefix:{route.prefix}: P longer than a block "
                              f"({T1} ids = seq_length + 1)")
        chosen_Nk, ll_pre = route_prefix(pool, blocks_NT1[:, :route.prefix], k, log_prior)
        split = ll_pre.shape[1]
        positions += n * N * split
    ll_NTk = _chosen_ll(pool, blocks_NT1, chosen_Nk, batch_size)
    positions += k * N * (T1 - 1)
    ll_NTk = torch.where(valid_NT.unsqueeze(-1), ll_NTk, 0.0)
    nll = 0.0
    if split:  # inside the prefix: the whole forest's posterior mixture
        ll_pre = torch.where(valid_NT[:, :split].unsqueeze(-1), ll_pre, 0.0)
        nll += float(mix_ll(prefix_log_posterior(ll_pre, log_prior), ll_pre, valid_NT[:, :split]).sum())
    log_w = prefix_log_posterior(ll_NTk, log_prior[chosen_Nk])  # the posterior restricted to the k
    nll += float(mix_ll(log_w[:, split:], ll_NTk[:, split:], valid_NT[:, split:]).sum())
    seconds = time.perf_counter() - start
    mean = nll / max(tokens, 1)
    return {"nll": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": tokens,
            "expert_forwards_per_token": positions / max(tokens, 1), "seconds": seconds,
            "ms_per_token": 1000.0 * seconds / max(tokens, 1),
            "chosen": [[pool.ids[j] for j in row] for row in chosen_Nk.tolist()]}


def evaluate_routed(pool, blocks: Mapping[str, torch.Tensor], route: Route,
                    priors: Mapping[str, torch.Tensor] | None = None, *, batch_size: int = 8) -> dict:
    """{"route", "topk", "experts", "results": {domain: evaluate_block_set(...)}}."""
    priors = dict(priors or {})
    results = {d: evaluate_block_set(pool, b, route, priors.get(d), batch_size=batch_size)
               for d, b in blocks.items()}
    return {"route": route.label(), "topk": route.topk, "experts": list(pool.ids),
            "max_models_in_memory": pool.peak, "results": results}


def generate_routed(pool, prompts: Sequence[Sequence[int]], cfg, route: Route,
                    prior_K: torch.Tensor | None = None, *, update: bool = True,
                    kv_cache: bool = True, cluster=None) -> dict:
    """Route each prompt, then sample from its k experts only (KV cache, fused op).
    Route "cluster" needs `cluster` (a routing.cluster_tokens.ClusterRouting over the pool's
    experts, in the pool's order, without top-k).
    Returns {"results": [GenerationResult], "chosen": [[ids]], "expert_forwards_per_token",
    "seconds", "ms_per_token", "max_models_in_memory"}."""
    from megatron_btm.inference.generate import check_prompt, generate_batch
    n, k = len(pool), route.topk
    route.check(n)
    if (route.kind == "cluster") != (cluster is not None):
        raise ConfigError("--route cluster goes with a cluster router (--clusters), and only it")
    if route.kind == "prior" and prior_K is None and k < n:
        raise ConfigError("--route prior with --topk < the forest size: needs a cached prior (--prior)")
    log_prior = log_prior_or_uniform(prior_K, n)
    vocab = pool.get([pool.ids[0]])[0].vocab_size
    rows = [check_prompt(p, vocab, f"prompt {b}" if len(prompts) > 1 else "prompt")
            for b, p in enumerate(prompts)]
    start = time.perf_counter()
    positions = 0
    if route.kind == "prefix":
        short = min(len(r) for r in rows)
        if route.prefix > short:
            raise ConfigError(f"--route prefix:{route.prefix}: P longer than the prompt ({short} tokens)")
        chosen = route_prefix(pool, torch.tensor([r[:route.prefix] for r in rows]), k, log_prior)[0]
        positions += n * len(rows) * (route.prefix - 1)
    elif route.kind == "cluster":
        chosen = topk_rows(cluster.start(rows).log_weights(), k)
    else:
        chosen = topk_rows(log_prior.unsqueeze(0), k).expand(len(rows), k)
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, row in enumerate(chosen.tolist()):
        groups.setdefault(tuple(row), []).append(b)
    results: list = [None] * len(rows)
    for experts_idx, members in groups.items():
        experts = pool.get([pool.ids[j] for j in experts_idx])
        idx = torch.tensor(experts_idx)
        among = None if cluster is None else type(cluster)(
            cluster.router.subset([pool.ids[j] for j in experts_idx]), cluster.tokenizer)
        out = generate_batch(experts, [rows[b] for b in members], cfg,
                             log_prior=log_prior[idx], update=update, kv_cache=kv_cache,
                             cluster=among)
        for b, res in zip(members, out):
            results[b] = res
            positions += k * (len(rows[b]) + len(res.tokens) - 1)
    seconds = time.perf_counter() - start
    generated = sum(len(r.tokens) for r in results)
    return {"results": results, "chosen": [[pool.ids[j] for j in row] for row in chosen.tolist()],
            "expert_forwards_per_token": positions / max(generated, 1), "seconds": seconds,
            "ms_per_token": 1000.0 * seconds / max(generated, 1),
            "max_models_in_memory": pool.peak}
