"""Router rows of a merged MoE: `hidden`, `hidden-centered`, `lda` (each from the domains'
router inputs), `random`, zeros.

All data-driven rows come from one pass: the merged model runs with a zero router (uniform over
all n experts) on the first `num_sequences` blocks of each expert's domain; per layer l, the
router's input x (the pre-MLP norm's output, exactly what the router sees) gives, per domain d,
its mean mu_d and covariance C_d over the valid tokens. With mu = mean_d mu_d (domains weighted
equally):
- `hidden` (mergekit's hidden mode; FlexOlmo's domain-embedding rows without an external
  embedder): row_d = mu_d / ||mu_d||;
- `hidden-centered`: row_d = (mu_d - mu) / ||mu_d - mu|| (the direction shared by every domain,
  which dominates mu_d, removed);
- `lda` (linear discriminant, equal priors): row_d = S^-1 (mu_d - mu) with S = (1 - a) C + a
  tr(C)/H I, C = mean_d C_d, a = LDA_SHRINKAGE (a LayerNorm output lies in a hyperplane, so C is
  singular); bias_d = -(mu_d - mu)^T S^-1 (mu_d + mu) / 2, written as the router's bias where the
  router has one (add_bias_linear; Megatron's TopKRouter adds it to the logits), else dropped.
  softmax(logits) is then the Gaussian model's posterior over domains.
Experts of the same domain get the same row. Layer l's input is the uniform-router model's, not
the final router's (the rows are computed in one pass).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch


def _shape(moe_config: dict) -> tuple[int, int, int]:
    return moe_config["num_layers"], moe_config["num_moe_experts"], moe_config["hidden_size"]


def zero_rows(moe_config: dict, *, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(_shape(moe_config), dtype=dtype)


def random_rows(moe_config: dict, *, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Megatron's router init: normal(0, init_method_std), here from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(_shape(moe_config), generator=g) * moe_config["init_method_std"]).to(dtype)


def domain_blocks(cfg, forest, ids: Sequence[str], paths: Sequence[Path], domains: Sequence[str],
                  moe_config: dict) -> dict[str, torch.Tensor]:
    """{domain: [N, T+1] blocks} of each merged expert's domain, checked before anything is
    written: the data's tokenizer is the forest's, each split exists and fits the vocabulary."""
    from megatron_btm.inference.blocks import read_eval_blocks
    from megatron_btm.inference.forest_eval import check_tokenizers
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f"--data {cfg.data}: folder not found")
    check_tokenizers(cfg.forest, list(zip(ids, paths)), data_dir=cfg.data)
    return {d: read_eval_blocks(cfg.data, d, cfg.split, moe_config["seq_length"],
                                max_blocks=cfg.num_sequences, vocab_size=moe_config["vocab_size"])
            for d in dict.fromkeys(domains)}


def _routers(model) -> list:
    from megatron_btm.megatron.checkpoint import _unwrap
    return [layer.mlp.router for layer in _unwrap(model).decoder.layers]


def _batches(blocks: torch.Tensor, batch_size: int):
    from megatron_btm.inference.scoring import IGNORE, split_block
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i:i + batch_size]
        inputs, _ = split_block(b)
        yield inputs, (b[:, :-1] != IGNORE).t().reshape(-1)  # [S*B] in Megatron's [S, B] order


def _run(expert, blocks: Mapping[str, torch.Tensor], batch_size: int, hook, progress: bool, desc: str):
    """Forward every domain's blocks with `hook(layer, router, x [S*B, H], mask [S*B], domain)`
    called at each router's input."""
    from tqdm import tqdm
    state: dict = {}
    handles = [r.register_forward_pre_hook(
        lambda mod, args, layer=i: hook(layer, mod, args[0].reshape(-1, args[0].shape[-1]),
                                        state["mask"], state["domain"]))
        for i, r in enumerate(_routers(expert.model))]
    total = sum(-(-b.shape[0] // batch_size) for b in blocks.values())
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress)
    try:
        for domain, b in blocks.items():
            state["domain"] = domain
            for inputs, mask in _batches(b, batch_size):
                state["mask"] = mask.to(expert.device)
                expert.logits(inputs)
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        bar.close()


METHODS = ("hidden", "hidden-centered", "lda")
LDA_SHRINKAGE = 0.01
"""a of `lda`: 1e-4..1e-2 route alike on the valid split, 0.1 and up worse (bench/moe_routing.py)"""


def domain_stats(checkpoint: str | os.PathLike, blocks: Mapping[str, torch.Tensor], *,
                 batch_size: int = 8, progress: bool = False) -> dict[str, dict]:
    """{domain: {"sum": [L, H], "outer": [L, H, H] (sum of x x^T), "count": tokens}} (float64) of
    the router inputs of the MoE checkpoint run as stored (a zero router over top-n is the
    uniform mixture of the experts)."""
    from megatron_btm.inference.scoring import load_expert
    expert = load_expert(checkpoint, name="uniform-router MoE")
    num_layers, hidden = expert.config.num_layers, expert.config.hidden_size
    stats = {d: empty_stats(num_layers, hidden) for d in blocks}

    def hook(layer, router, x, mask, domain):
        add_stats(stats[domain], layer, x[mask].double().cpu())

    _run(expert, blocks, batch_size, hook, progress, "router rows")
    del expert
    return stats


def empty_stats(num_layers: int, hidden: int) -> dict:
    """One domain's domain_stats entry before any token."""
    return {"sum": torch.zeros(num_layers, hidden, dtype=torch.float64),
            "outer": torch.zeros(num_layers, hidden, hidden, dtype=torch.float64), "count": 0}


def stats_of_tokens(x: torch.Tensor) -> dict:
    """domain_stats' entry of tokens x [L, N, H] (every layer's router inputs of N tokens)."""
    x = x.double()
    stats = empty_stats(x.shape[0], x.shape[2])
    for layer in range(x.shape[0]):
        add_stats(stats, layer, x[layer])
    return stats


def add_stats(stats: dict, layer: int, x: torch.Tensor) -> None:
    """Accumulate tokens x [N, H] (float64) of one layer into domain_stats' entry."""
    stats["sum"][layer] += x.sum(0)
    stats["outer"][layer] += x.t() @ x
    if layer == 0:
        stats["count"] += x.shape[0]


def rows_from_stats(stats: Mapping[str, dict], domains: Sequence[str], method: str, *,
                    shrinkage: float = LDA_SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([L, n, H] float32 rows, [L, n] float32 bias or None) of `method` (module docstring) for
    experts of `domains` (in MoE order) from domain_stats."""
    if method not in METHODS:
        raise ValueError(f"router method {method!r}: valid values are {list(METHODS)}")
    uniq = list(dict.fromkeys(domains))
    empty = [d for d in uniq if stats[d]["count"] == 0]
    if empty:
        raise ValueError(f"router rows: no valid tokens in the sample of domain(s) {', '.join(empty)}")
    mu = torch.stack([stats[d]["sum"] / stats[d]["count"] for d in uniq], dim=1)  # [L, D, H]
    center = mu.mean(1, keepdim=True)
    bias = None
    if method == "hidden":
        rows = torch.nn.functional.normalize(mu, dim=-1)
    elif method == "hidden-centered":
        rows = torch.nn.functional.normalize(mu - center, dim=-1)
    else:
        cov = sum(stats[d]["outer"] / stats[d]["count"] for d in uniq) / len(uniq) \
            - torch.einsum("ldh,ldk->lhk", mu, mu) / len(uniq)   # mean of the domains' covariances
        hidden = cov.shape[-1]
        eye = torch.eye(hidden, dtype=cov.dtype)
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
        s = (1 - shrinkage) * cov + shrinkage * trace / hidden * eye
        rows = torch.linalg.solve(s, (mu - center).transpose(1, 2)).transpose(1, 2)
        bias = -0.5 * (rows * (mu + center)).sum(-1)
    index = [uniq.index(d) for d in domains]
    return rows[:, index].float(), (bias[:, index].float() if bias is not None else None)


def hidden_rows(checkpoint: str | os.PathLike, blocks: Mapping[str, torch.Tensor],
                domains: Sequence[str], *, method: str = "hidden", batch_size: int = 8,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, int]]:
    """([L, n, H] float32 router rows, [L, n] bias or None, {domain: tokens averaged}) of
    `method` from the MoE checkpoint (run as stored: a zero router over top-n)."""
    stats = domain_stats(checkpoint, blocks, batch_size=batch_size, progress=progress)
    rows, bias = rows_from_stats(stats, domains, method)
    return rows, bias, {d: v["count"] for d, v in stats.items()}


def routing_fractions(checkpoint: str | os.PathLike, blocks: Mapping[str, torch.Tensor], *,
                      topk: int = 1, batch_size: int = 8, progress: bool = False
                      ) -> dict[str, list[list[float]]]:
    """{domain: per layer, the fraction of its valid tokens whose top-1 router expert is e
    ([L][n])}, running the checkpoint with `topk` active experts."""
    from megatron_btm.inference.scoring import load_expert
    expert = load_expert(checkpoint, overrides={"moe_router_topk": topk})
    n = expert.config.num_moe_experts
    hits = {d: torch.zeros(expert.config.num_layers, n, dtype=torch.float64) for d in blocks}

    def hook(layer, router, x, mask, domain):
        logits = x[mask].float() @ router.weight.float().t()
        if router.bias is not None:
            logits = logits + router.bias.float()
        hits[domain][layer] += torch.bincount(logits.argmax(-1).cpu(), minlength=n).double()

    _run(expert, blocks, batch_size, hook, progress, "routing")
    return {d: (h / h.sum(-1, keepdim=True)).tolist() for d, h in hits.items()}
