"""Shared inputs for the mixing-op tests: random cases with the awkward features the op must
handle (V not a multiple of any vector width or of the CPU chunk, N = 1, ignored tokens,
logits of ±1e4, −inf log-weights of pruned experts, unnormalised log-weights)."""
from __future__ import annotations

import torch

IGNORE = -100

# (K, N, V): K from 1 to 16; V odd / prime / just past the 2048-element CPU chunk.
SHAPES = [(1, 1, 7), (2, 3, 33), (3, 17, 1000), (16, 5, 257), (8, 4, 4099), (4, 1, 2049)]


def make_case(K: int, N: int, V: int, *, seed: int = 0, extreme: bool = True,
              prune: bool = True, ignore: bool = True, dtype=torch.float64):
    """Returns logits_KNV (dtype), log_weights_NK (fp64 → cast by callers), targets_N."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, N, V, generator=g, dtype=torch.float64) * 3.0
    if extreme and V > 2:  # a few logits at ±1e4 (softmax then saturates at one entry)
        idx = torch.randint(0, V, (K, N, 2), generator=g)
        logits.scatter_(-1, idx[..., :1], 1e4)
        logits.scatter_(-1, idx[..., 1:], -1e4)
    # Unnormalised on purpose: the op must not renormalise over experts.
    lw = torch.randn(N, K, generator=g, dtype=torch.float64) - 1.0
    if prune and K > 1:  # prune one expert per token (never all of them)
        pruned = torch.randint(0, K, (N,), generator=g)
        lw[torch.arange(N), pruned] = float("-inf")
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = V - 1
    if ignore and N > 2:
        targets[1] = IGNORE
    return logits.to(dtype), lw, targets
