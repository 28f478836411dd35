"""Synthetic unit records (the JSON the runner writes) with chosen per-domain NLLs."""
from __future__ import annotations

import math

TRAIN, NOVEL = ["alpha", "beta", "gamma"], ["delta"]


def plan_dict(**over):
    plan = {"name": "synthetic", "train_domains": TRAIN, "novel_domains": NOVEL,
            "main_seed_fraction": 0.5, "seed_fractions": [0.0, 0.5, 0.75],
            "dense_seeds": [1, 2], "topk": [1, 2], "branch_k": 2, "removal_domain": "alpha",
            "crossover_fractions": [], "total_tokens": 4096, "vocab_size": 256, "global_batch_size": 8,
            "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16}}
    plan.update(over)
    return plan


def cell(nll, tokens=100):
    return {"nll": nll, "ppl": math.exp(nll), "tokens": tokens}


def table(rows: dict[str, dict[str, float]], tokens: dict[str, int] | None = None):
    """rows: {row: {domain: nll}} -> {domain: {row: cell}}."""
    out: dict = {}
    for row, per in rows.items():
        for d, nll in per.items():
            out.setdefault(d, {})[row] = cell(nll, (tokens or {}).get(d, 100))
    return out


def const(value, domains=TRAIN + NOVEL):
    return {d: value for d in domains}


def units(*, dense=(3.0, 3.02), ens=2.9, uniform_ens=2.95, post=3.1, uni_avg=3.3, top1=2.91,
          top2=2.9, sweep=None, removal=None, random=3.0, novel=(3.2, 3.4)):
    """A consistent set of unit records; every value is an NLL applied to all domains."""
    sweep = sweep or {0.0: 3.2, 0.5: ens, 0.75: 3.05}
    out = {}
    for seed, nll in zip((1, 2), dense):
        out[f"dense-s{seed}"] = {"kind": "dense", "seed": seed, "compute": {"tokens": 4096},
                                 "test": table({"model/dense": const(nll)})}
    for f, nll in sweep.items():
        rows = {"ensemble/cached": const(nll), "ensemble/uniform": const(uniform_ens),
                "top1/doc": const(top1), "top2/doc": const(top2),
                "model/posterior-average": const(post), "model/uniform-average": const(uni_avg),
                "model/argmax-average": const(top1)}
        if f != 0.5:
            rows = {"ensemble/cached": const(nll), "model/posterior-average": const(post + 0.1)}
        out[f"btm-f{f:.2f}"] = {"kind": "btm", "seed_fraction": f,
                                "compute": {"seed_tokens": int(4096 * f), "tokens": 4096},
                                "test": table(rows)}
    removal = removal or {"alpha": ens + 0.5, "beta": ens + 0.01, "gamma": ens}
    out["removal-alpha"] = {"kind": "removal", "removed": "alpha", "descendants": [],
                            "test": table({"ensemble/cached": removal})}
    out["random-split"] = {"kind": "random-split", "compute": {"tokens": 2048},
                           "test": table({"ensemble/cached": const(random, TRAIN),
                                          "ensemble/uniform": const(random, TRAIN)})}
    out["novel-delta"] = {"kind": "novel", "domain": "delta", "tokens": 512,
                          "parents": {"branch-top2": [{"id": "alpha", "weight": 0.7},
                                                      {"id": "beta", "weight": 0.3}]},
                          "test": table({"model/branch-top2": {"delta": novel[0]},
                                         "model/branch-seed": {"delta": novel[1]},
                                         "model/branch-point-top2": {"delta": 3.6}})}
    return out
