"""Using a forest: ensemble scoring, perplexity tables, cached priors, generation.

- `scoring`: load expert checkpoints (any saved TP/PP) at the current TP; token log-likelihoods.
- `blocks`: evaluation blocks from preprocessed held-out documents.
- `ensemble`: pure math: posterior-weighted / fixed / top-k mixtures (via `ops.mix_nll`).
- `forest_eval`: `evaluate_forest`, `estimate_priors` (the library behind `btm eval/prior`).
- `generate`: sampling from the ensemble or a single (averaged) model (`generate.generate`).

Attributes are imported lazily so that `btm --help` does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "evaluate_forest": "megatron_btm.inference.forest_eval",
    "estimate_priors": "megatron_btm.inference.forest_eval",
    "forest_checkpoints": "megatron_btm.inference.forest_eval",
    "format_table": "megatron_btm.inference.forest_eval",
    "SamplingConfig": "megatron_btm.inference.generate",
    "load_expert": "megatron_btm.inference.scoring",
    "load_experts": "megatron_btm.inference.scoring",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_btm.inference' has no attribute {name!r}")
