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


class Prefetcher:
    """The micro-batches of each step on this rank's device.

    With `enabled` (CUDA), the next step's micro-batches are assembled and pinned on a
    background thread while the current step runs, and copied with non_blocking=True. Without
    it (CPU) batches are assembled when asked for, and `to_device` leaves them as they are.
    """

    def __init__(self, make, *, last_step: int, enabled: bool):
        from megatron_btm.megatron import device
        self._device = device
        self._make, self._last, self._enabled = make, last_step, enabled
        self._pool = self._future = None
        self._next = None
        if enabled:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btm-prefetch")

    def _pinned(self, step: int):
        return [self._device.pin(mb) for mb in self._make(step=step)]

    def get(self, step: int) -> list[dict[str, torch.Tensor]]:
        if self._future is not None and self._next == step:
            host = self._future.result()
        else:
            host = self._pinned(step) if self._enabled else self._make(step=step)
        self._future = None
        if self._enabled and step + 1 < self._last:
            self._future, self._next = self._pool.submit(self._pinned, step + 1), step + 1
        return [self._device.to_device(mb) for mb in host]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
