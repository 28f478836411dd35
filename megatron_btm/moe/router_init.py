"""Router rows of a merged MoE: `hidden` (each domain's mean router input), `random`, zeros.

`hidden` (mergekit's hidden mode; FlexOlmo's domain-embedding rows without an external
embedder): run the merged model with a zero router (uniform over all n experts) on the first
`num_sequences` blocks of each expert's domain; per layer l, the router's input x (the pre-MLP
norm's output, exactly what the router sees) is averaged over the valid tokens, and router row
e of layer l = mean_x / ||mean_x||. Experts of the same domain get the same row. Layer l's
input is the uniform-router model's, not the final router's (the rows are computed in one pass).
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


def hidden_rows(checkpoint: str | os.PathLike, blocks: Mapping[str, torch.Tensor],
                domains: Sequence[str], *, batch_size: int = 8, progress: bool = False
                ) -> tuple[torch.Tensor, dict[str, int]]:
    """([L, n, H] float32 router rows, {domain: tokens averaged}) from the MoE checkpoint (run
    as stored: a zero router over top-n is the uniform mixture of the experts)."""
    from megatron_btm.inference.scoring import load_expert
    expert = load_expert(checkpoint, name="uniform-router MoE")
    num_layers, hidden = expert.config.num_layers, expert.config.hidden_size
    sums = {d: torch.zeros(num_layers, hidden, dtype=torch.float64) for d in blocks}
    counts = {d: 0 for d in blocks}

    def hook(layer, router, x, mask, domain):
        sums[domain][layer] += x[mask].double().sum(0).cpu()
        if layer == 0:
            counts[domain] += int(mask.sum())

    _run(expert, blocks, batch_size, hook, progress, "router rows")
    del expert
    means = {d: sums[d] / max(counts[d], 1) for d in blocks}
    rows = torch.stack([torch.nn.functional.normalize(means[d], dim=-1) for d in domains], dim=1)
    return rows.float(), counts


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
