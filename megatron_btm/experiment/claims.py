"""The numbers behind the report, computed from run JSONs only (pure; no torch, no I/O).

Perplexities over a set of domains are token-weighted: ppl = exp(Σ nll·tokens / Σ tokens).
Comparisons are relative: `gain(a, b) = ppl_b / ppl_a − 1` is how much better a is than b
(positive: a is better). The noise level is the dense baseline's seed-to-seed spread
(max/min − 1 of its mean perplexity across seeds); a claim *held* when its gain exceeds the
noise, is *within noise* when |gain| <= noise, and *did not hold* when it is below −noise.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from megatron_btm.inference.tables import mean_ppl
from megatron_btm.inference import rows as R

Table = Mapping[str, Mapping[str, Mapping[str, float]]]  # {domain: {row: {nll, ppl, tokens}}}


def gain(better: float, worse: float) -> float:
    """How much lower `better` is than `worse`, as a fraction of `better` (ppl_b / ppl_a − 1)."""
    return worse / better - 1.0


def dense_noise(dense_units: list[Mapping[str, Any]], domains: list[str]) -> float:
    """max/min − 1 of the dense seeds' mean perplexity over `domains` (nan with < 2 seeds)."""
    ppls = [mean_ppl(u["test"], R.DENSE, domains) for u in dense_units]
    ppls = [p for p in ppls if not math.isnan(p)]
    return max(ppls) / min(ppls) - 1.0 if len(ppls) >= 2 else float("nan")


def dense_table(dense_units: list[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """One `model/dense` row per domain averaging the seeds' NLL (the reference dense model)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    if not dense_units:
        return out
    for d in dense_units[0]["test"]:
        cells = [u["test"][d][R.DENSE] for u in dense_units if d in u["test"]]
        nll = sum(c["nll"] for c in cells) / len(cells)
        out[d] = {R.DENSE: {"nll": nll, "ppl": math.exp(nll), "tokens": cells[0]["tokens"]}}
    return out


def verdict(g: float, noise: float) -> str:
    if math.isnan(g):
        return "not measured"
    if math.isnan(noise):
        return ("held" if g > 0 else "did not hold") + " (noise unknown: one dense seed)"
    if g > noise:
        return "held"
    if g >= -noise:
        return "within noise"
    return "did not hold"


def _claim(name: str, g: float, noise: float, detail: str) -> dict[str, Any]:
    ratio = g / noise if noise and not math.isnan(noise) and not math.isnan(g) else float("nan")
    return {"claim": name, "gain": g, "noise": noise, "gain_over_noise": ratio,
            "verdict": verdict(g, noise), "detail": detail}


def removal_effect(before: Mapping[str, Any], after: Mapping[str, Any], removed: str,
                   train: list[str]) -> tuple[float, float]:
    """Relative ppl increase of the cached-prior ensemble on the removed domain and on the
    others after removing its expert."""
    others = [d for d in train if d != removed]
    up = [mean_ppl(after, R.ENSEMBLE_CACHED, ds) / mean_ppl(before, R.ENSEMBLE_CACHED, ds) - 1
          for ds in ([removed], others)]
    return up[0], up[1]


def _topk_claimed(topk: list[int], num_experts: int) -> list[int]:
    """The k of the top-k claims: the smallest k below the number of experts, and the next."""
    ks = sorted(k for k in topk if k < num_experts)
    return ks[:2]


def compute_claims(units: Mapping[str, Mapping[str, Any]], plan: Mapping[str, Any]) -> dict[str, Any]:
    """Every number of the report's claims section, from the unit JSONs (keyed by unit name)."""
    train, novel = list(plan["train_domains"]), list(plan["novel_domains"])
    main = units.get(f"btm-f{plan['main_seed_fraction']:.2f}")
    dense_units = [units[f"dense-s{s}"] for s in plan["dense_seeds"] if f"dense-s{s}" in units]
    noise = dense_noise(dense_units, train)
    dense = dense_table(dense_units)
    dense_ppl = mean_ppl(dense, R.DENSE, train)
    out: dict[str, Any] = {"noise": noise, "dense_ppl_train": dense_ppl, "claims": []}
    claims = out["claims"]
    if main is None:
        return out
    t = main["test"]
    ens = mean_ppl(t, R.ENSEMBLE_CACHED, train)
    claims.append(_claim("ELMForest ensemble (cached prior) beats the compute-matched dense model "
                         "on training domains", gain(ens, dense_ppl), noise,
                         f"ensemble {ens:.2f} vs dense {dense_ppl:.2f} ppl"))
    post, uni = mean_ppl(t, R.POSTERIOR_AVERAGE, train), mean_ppl(t, R.UNIFORM_AVERAGE, train)
    claims.append(_claim("posterior-weighted parameter averaging beats uniform averaging",
                         gain(post, uni), noise, f"posterior {post:.2f} vs uniform {uni:.2f} ppl"))
    for k in _topk_claimed(plan["topk"], len(train)):
        tk = mean_ppl(t, R.topk_row(k), train)
        loss = tk / ens - 1.0  # how much worse top-k is than the full ensemble
        limit = 0.0 if math.isnan(noise) else noise
        claims.append({"claim": f"top-{k} ensemble is close to the full ensemble (within the noise)",
                       "gain": -loss, "noise": noise, "gain_over_noise": -loss / noise if noise else
                       float("nan"), "verdict": "not measured" if math.isnan(loss) else
                       ("held" if loss <= limit else "did not hold"),
                       "detail": f"top-{k} {tk:.2f} vs full {ens:.2f} ppl ({loss:+.2%})"})
    sweep = {f: mean_ppl(units[f"btm-f{f:.2f}"]["test"], R.ENSEMBLE_CACHED, train)
             for f in sorted(plan["seed_fractions"]) if f"btm-f{f:.2f}" in units}
    out["sweep"] = sweep
    if len(sweep) >= 3:
        ends = (min(sweep), max(sweep))
        inner = min(v for f, v in sweep.items() if f not in ends)
        best = min(sweep, key=sweep.get)
        # > 0 when the best interior fraction beats both ends of the sweep
        claims.append(_claim("the seed compute fraction has an interior optimum",
                             gain(inner, min(sweep[e] for e in ends)), noise,
                             "ensemble ppl by seed fraction: " + ", ".join(
                                 f"{f:.0%}: {v:.2f}" for f, v in sweep.items()) + f"; best {best:.0%}"))
    rem = units.get(f"removal-{plan['removal_domain']}")
    if rem is not None:
        r = plan["removal_domain"]
        up_r, up_o = removal_effect(t, rem["test"], r, train)
        out["removal"] = {"removed_increase": up_r, "others_increase": up_o}
        claims.append(_claim(f"removing the {r} expert degrades {r} much more than the other domains",
                             up_r - up_o, noise, f"{r} ppl {up_r:+.1%}, others {up_o:+.1%}"))
    rs = units.get("random-split")
    if rs is not None:
        rnd = mean_ppl(rs["test"], R.ENSEMBLE_CACHED, train)
        claims.append(_claim("domain experts beat random-split experts", gain(ens, rnd), noise,
                             f"domain-split ensemble {ens:.2f} vs random-split {rnd:.2f} ppl"))
    nov = [units[f"novel-{d}"] for d in novel if f"novel-{d}" in units]
    if nov:
        k = plan["branch_k"]
        a = mean_ppl({u["domain"]: u["test"][u["domain"]] for u in nov}, R.model_row(f"branch-top{k}"),
                     [u["domain"] for u in nov])
        b = mean_ppl({u["domain"]: u["test"][u["domain"]] for u in nov}, R.model_row("branch-seed"),
                     [u["domain"] for u in nov])
        claims.append(_claim(f"branching novel-domain experts from the posterior top-{k} average beats "
                             "branching from the seed", gain(a, b), noise,
                             f"top-{k} branch {a:.2f} vs seed branch {b:.2f} ppl (novel domains)"))
    return out


def num_params(model: Mapping[str, Any], vocab_size: int, divisible_by: int = 128) -> int:
    """Parameters of a plan's model (its `model:` mapping, any architecture) at `vocab_size`:
    GPTConfig.num_parameters, the count `btm plan cost` uses; the embedding is padded to a
    multiple of the model's make_vocab_size_divisible_by (default `divisible_by`)."""
    from megatron_btm.megatron.model import GPTConfig
    return GPTConfig.from_dict({"make_vocab_size_divisible_by": divisible_by, **model,
                                "vocab_size": vocab_size}).num_parameters()
