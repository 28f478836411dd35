"""Row names of an evaluation table (`btm eval`'s results.json), defined once.

    expert/<id>        one expert alone
    ensemble/<mode>    the whole forest: uniform | cached prior, posterior updating; *-fixed
    top<k>/doc         top-k of the cached prior, posterior updating over those k
    top<k>/token       top-k of the posterior at each token
    ensemble/cluster   c-BTM cluster routing: weights from the prefix's distances to the
                       cluster centroids at each token (`btm eval --clusters`)
    top<k>/cluster     the same, top-k renormalised at each token
    model/<name>       one single model (a parameter average, a dense baseline, --checkpoint NAME=C)
    model/<method>-average   the average of the forest by an averaging method (uniform, posterior,
                       argmax): the name experiments and the demo give their averaged models
"""
from __future__ import annotations

TOPK_LEVELS = ("doc", "token", "cluster")


def expert_row(expert_id: str) -> str:
    return f"expert/{expert_id}"


def ensemble_row(mode: str) -> str:
    return f"ensemble/{mode}"


def topk_row(k: int, level: str = "doc") -> str:
    if level not in TOPK_LEVELS:
        raise ValueError(f"top-k level {level!r}: valid levels are {TOPK_LEVELS}")
    return f"top{k}/{level}"


def model_row(name: str) -> str:
    return f"model/{name}"


def model_name(row: str) -> str:
    """The NAME of a model/NAME row (what evaluate_forest's extra_models are keyed by)."""
    return row.removeprefix("model/")


def average_row(method: str) -> str:
    """model/<method>-average: the forest averaged by `method` (averaging.methods)."""
    return model_row(f"{method}-average")


def is_expert_row(row: str) -> bool:
    return row.startswith("expert/")


ENSEMBLE_UNIFORM = ensemble_row("uniform")
ENSEMBLE_CACHED = ensemble_row("cached")
ENSEMBLE_CLUSTER = ensemble_row("cluster")
DENSE = model_row("dense")
UNIFORM_AVERAGE = average_row("uniform")
POSTERIOR_AVERAGE = average_row("posterior")
ARGMAX_AVERAGE = average_row("argmax")
