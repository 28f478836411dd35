"""Averaging methods: pure functions returning the weight vector a (length n, sums to 1).

Every method has the signature ``fn(num_experts, *, prior=None, weights=None, k=None)`` and
returns a list of n floats. Registry: `METHODS`; `get_method(name)` raises listing valid names.

Weights that do not sum to 1 (explicit `weights`, or a `prior` given by hand) are *normalised
with a warning* when they are otherwise valid (finite, ≥ 0, positive sum): "1 1 2" on a command
line means 1/4, 1/4, 1/2. Negative, non-finite or all-zero weights are refused (ValueError).
`merge_tensors` itself is plain linear algebra and uses the weights exactly as given.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch

SUM_TOLERANCE = 1e-6


def normalize_weights(weights: Sequence[float], *, name: str = "weights") -> list[float]:
    """Validate and normalise to sum 1 (warning when the input did not already sum to 1)."""
    values = [float(w) for w in weights]
    if not values:
        raise ValueError(f"{name}: empty; need one weight per expert")
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{name}[{i}]={w!r}: weights must be finite and >= 0")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(f"{name}: all weights are 0; at least one must be positive")
    if abs(total - 1.0) > SUM_TOLERANCE:
        warnings.warn(f"{name} sum to {total!r}, not 1: normalising to {[w / total for w in values]}",
                      stacklevel=2)
    return [w / total for w in values]


def _need(value, what: str, method: str, num_experts: int) -> list[float]:
    if value is None:
        raise ValueError(f"method {method!r} needs {what} (one value per expert, {num_experts} experts)")
    values = [float(v) for v in torch.as_tensor(value, dtype=torch.float64).flatten().tolist()]
    if len(values) != num_experts:
        raise ValueError(f"{what}: {len(values)} values for {num_experts} experts (method {method!r})")
    return normalize_weights(values, name=what)


def _check_n(num_experts: int) -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}: must be a positive integer")


def uniform(num_experts: int, *, prior=None, weights=None, k=None) -> list[float]:
    """a_j = 1/n."""
    _check_n(num_experts)
    return [1.0 / num_experts] * num_experts


def weighted(num_experts: int, *, prior=None, weights=None, k=None) -> list[float]:
    """a = the given `weights` (normalised, see module doc)."""
    _check_n(num_experts)
    return _need(weights, "weights", "weighted", num_experts)


def argmax(num_experts: int, *, prior=None, weights=None, k=None) -> list[float]:
    """One-hot on the most probable expert under the prior (lowest index on ties)."""
    _check_n(num_experts)
    p = _need(prior, "prior", "argmax", num_experts)
    best = max(range(num_experts), key=lambda j: (p[j], -j))
    return [1.0 if j == best else 0.0 for j in range(num_experts)]


def posterior(num_experts: int, *, prior=None, weights=None, k=None) -> list[float]:
    """a = π, the (cached) domain prior of the target domain."""
    _check_n(num_experts)
    return _need(prior, "prior", "posterior", num_experts)


def topk(num_experts: int, *, prior=None, weights=None, k=None) -> list[float]:
    """π restricted to its k largest entries, renormalised; 0 elsewhere."""
    from megatron_btm.routing.topk import topk_prior
    _check_n(num_experts)
    p = _need(prior, "prior", "topk", num_experts)
    if k is None:
        raise ValueError(f"method 'topk' needs k (1 <= k <= n={num_experts})")
    indices, values = topk_prior(torch.tensor(p, dtype=torch.float64), k)
    out = [0.0] * num_experts
    for j, w in zip(indices.tolist(), values.tolist()):
        out[j] = w
    return out


METHODS: dict[str, Callable[..., list[float]]] = {
    "uniform": uniform,
    "weighted": weighted,
    "argmax": argmax,
    "posterior": posterior,
    "topk": topk,
}


def get_method(name: str) -> Callable[..., list[float]]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown averaging method {name!r}; valid methods: {', '.join(METHODS)}") from None


def accumulate_(acc: torch.Tensor, tensor: torch.Tensor, weight: float) -> torch.Tensor:
    """acc += weight · tensor, in acc's dtype (fp32 or fp64), without a full-size temporary."""
    if weight == 1.0:
        return acc.add_(tensor)
    return acc.add_(tensor, alpha=weight)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 inputs keep fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_j w_j · t_j accumulated in fp32 (fp64 for fp64 input), returned in the input dtype.

    Experts with weight exactly 0 are skipped (so a one-hot average returns that expert bit for
    bit, even if another expert holds inf/NaN). Weights are used as given (not normalised).
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"merge_tensors: {len(tensors)} tensors but {len(weights)} weights")
    first = tensors[0]
    for j, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(f"merge_tensors: tensor {j} is {t.dtype}{list(t.shape)}, tensor 0 is "
                             f"{first.dtype}{list(first.shape)}")
        if not first.is_floating_point():
            raise ValueError(f"merge_tensors: cannot average non-floating tensors ({first.dtype})")
    acc = torch.zeros(first.shape, dtype=accumulator_dtype(first.dtype), device=first.device)
    for t, w in zip(tensors, weights):
        if w != 0.0:
            accumulate_(acc, t, float(w))
    return acc.to(first.dtype)
