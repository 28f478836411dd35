"""Deterministic batching: which samples each data-parallel rank reads at each step.

Sample order is a pure function of (step, global batch size, DP rank): a resumed run reads
exactly what the uninterrupted run would have read, with no iterator state to save beyond the
step. Tensor- and pipeline-parallel ranks of one DP replica read the same samples.
"""
from __future__ import annotations

import torch

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for key in KEYS:
        values = [torch.as_tensor(item[key]) for item in items]
        out[key] = torch.stack(values).long() if key != "loss_mask" else torch.stack(values).float()
    return out


def train_microbatches(dataset, *, step: int, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of DP rank `dp_rank` for optimizer step `step` (0-based)."""
    per_rank = global_batch_size // dp_size
    start = step * global_batch_size + dp_rank * per_rank
    if start + per_rank > len(dataset):
        raise IndexError(f"step {step} needs samples up to {start + per_rank} but the training "
                         f"dataset has {len(dataset)}")
    idx = list(range(start, start + per_rank))
    return [collate([dataset[i] for i in idx[j:j + micro_batch_size]])
            for j in range(0, per_rank, micro_batch_size)]


def eval_microbatches(dataset, *, iters: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int) -> list[dict[str, torch.Tensor]]:
    """The same validation samples at every evaluation (first iters·mbs·dp of the dataset)."""
    n = min(iters, len(dataset) // (micro_batch_size * dp_size))
    batches = []
    for i in range(n):
        start = (i * dp_size + dp_rank) * micro_batch_size
        batches.append(collate([dataset[j] for j in range(start, start + micro_batch_size)]))
    return batches
