"""Claims across budgets, seed corpora and domain kinds, from run JSONs only (pure; no torch).

Budgets: the main budget (total_tokens, units dense-s<seed> / btm-f<f>) and each crossover
budget s × total_tokens (dense-x<s>-s<seed> / btm-x<s>-f<f>), all at the main seed fraction.
Each budget has its own seed noise (the spread of its dense seeds), so each verdict is judged
against the noise measured where it was measured. The crossover is *measured*: the pair of
adjacent run budgets between which the ensemble's verdict against dense turns to held; no line
is fitted through the points to guess a budget that was not run.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from megatron_btm.experiment.claims import _claim, dense_noise, dense_table, gain, removal_effect
from megatron_btm.inference import rows as R
from megatron_btm.inference.tables import mean_ppl

Units = Mapping[str, Mapping[str, Any]]


def budget_units(units: Units, plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{scale, dense: [unit...], btm: unit | None}] per budget with a dense run, ascending."""
    f = f"{plan['main_seed_fraction']:.2f}"
    out = []
    for scale in sorted([1.0] + list(plan.get("crossover_fractions", []))):
        tag = "" if scale == 1.0 else f"x{scale:g}-"
        dense = [units[k] for s in plan["dense_seeds"] if (k := f"dense-{tag}s{s}") in units]
        if dense:
            out.append({"scale": scale, "dense": dense,
                        "btm": units.get(f"btm-{tag}f{f}" if tag else f"btm-f{f}")})
    return out


def _row(name: str, better: float, worse: float, noise: float, detail: str) -> dict[str, Any]:
    return _claim(name, gain(better, worse), noise, detail)


def budget_rows(units: Units, plan: Mapping[str, Any], params: int | None) -> list[dict[str, Any]]:
    """Per budget: tokens per parameter, seed noise (train / novel domains), and the
    verdicts of ensemble, posterior average and argmax average against the mean dense model."""
    train, novel = list(plan["train_domains"]), list(plan["novel_domains"])
    rows = []
    for b in budget_units(units, plan):
        tokens = b["dense"][0]["compute"]["tokens"]
        dense = dense_table(b["dense"])
        nt, nn = dense_noise(b["dense"], train), dense_noise(b["dense"], novel)
        d_t, d_n = mean_ppl(dense, R.DENSE, train), mean_ppl(dense, R.DENSE, novel)
        t = (b["btm"] or {}).get("test", {})
        ens, post = mean_ppl(t, R.ENSEMBLE_CACHED, train), mean_ppl(t, R.POSTERIOR_AVERAGE, train)
        arg_t, arg_n = mean_ppl(t, R.ARGMAX_AVERAGE, train), mean_ppl(t, R.ARGMAX_AVERAGE, novel)
        rows.append({
            "scale": b["scale"], "dense_tokens": tokens, "dense_seeds": len(b["dense"]),
            "tokens_per_param": tokens / params if params else float("nan"),
            "noise_train": nt, "noise_novel": nn, "dense_train": d_t, "dense_novel": d_n,
            "ensemble": _row("ensemble beats dense (train)", ens, d_t, nt,
                             f"ensemble {ens:.2f} vs dense {d_t:.2f}"),
            "posterior": _row("posterior average beats dense (train)", post, d_t, nt,
                              f"posterior {post:.2f} vs dense {d_t:.2f}"),
            "argmax_train": _row("argmax beats dense (train)", arg_t, d_t, nt,
                                 f"argmax {arg_t:.2f} vs dense {d_t:.2f}"),
            "argmax_novel": _row("argmax loses to dense (novel)", d_n, arg_n, nn,
                                 f"dense {d_n:.2f} vs argmax {arg_n:.2f}")})
    return rows


def measured_crossover(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Between which two adjacent run budgets the ensemble's verdict turns to held (and its gain
    to positive); None where the run budgets do not bracket it."""
    run = [r for r in rows if not math.isnan(r["ensemble"]["gain"])]
    out: dict[str, Any] = {"budgets": [(r["tokens_per_param"], r["ensemble"]["gain"],
                                        r["ensemble"]["verdict"]) for r in run],
                           "held_between": None, "sign_between": None,
                           "held_at_all_run_budgets": bool(run) and all(
                               r["ensemble"]["verdict"] == "held" for r in run)}
    for a, b in zip(run, run[1:]):
        if out["sign_between"] is None and a["ensemble"]["gain"] <= 0 < b["ensemble"]["gain"]:
            out["sign_between"] = [a["tokens_per_param"], b["tokens_per_param"]]
        if out["held_between"] is None and a["ensemble"]["verdict"] != "held" \
                and b["ensemble"]["verdict"] == "held":
            out["held_between"] = [a["tokens_per_param"], b["tokens_per_param"]]
    return out


def sweep_claims(units: Units, plan: Mapping[str, Any], rows: list[Mapping[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Claim rows: averaging by domain kind, posterior vs dense across budgets, seed compute
    and novel domains, and each seed corpus (ensemble vs dense, removal)."""
    train, novel = list(plan["train_domains"]), list(plan["novel_domains"])
    out = []
    main = next((r for r in rows if r["scale"] == 1.0), None)
    if main is not None:
        out.append({**main["argmax_train"], "claim": "argmax parameter averaging (top-1 expert) "
                    "beats the compute-matched dense model on training domains"})
        if novel:
            out.append({**main["argmax_novel"], "claim": "argmax parameter averaging loses to the "
                        "dense model on novel domains (noise: dense spread on novel domains)"})
    measured = [r for r in rows if not math.isnan(r["posterior"]["gain"])]
    if len(measured) >= 2:
        rest = min(measured[1:], key=lambda r: r["posterior"]["gain"])
        c = dict(rest["posterior"])
        small = measured[0]["posterior"]
        c["claim"] = ("posterior-weighted averaging beats dense at every budget but the smallest "
                      "(one model size here: budget stands in for the paper's model size)")
        c["detail"] = "by tokens/param: " + ", ".join(
            f"{r['tokens_per_param']:.2f}: {r['posterior']['gain']:+.1%} ({r['posterior']['verdict']})"
            for r in measured) + f"; worst above the smallest shown"
        if small["verdict"] == "held":
            c["verdict"] += " (but it also beats dense at the smallest budget)"
        out.append(c)
    fr = {f: units[f"btm-f{f:.2f}"]["test"] for f in sorted(plan["seed_fractions"])
          if f"btm-f{f:.2f}" in units}
    if len(fr) >= 2 and novel and main is not None:
        lo, hi = min(fr), max(fr)
        g = {k: gain(mean_ppl(fr[hi], R.ENSEMBLE_CACHED, ds), mean_ppl(fr[lo], R.ENSEMBLE_CACHED, ds))
             for k, ds in (("train", train), ("novel", novel))}
        noise = max(main["noise_train"], main["noise_novel"])
        out.append(_claim(f"more seed compute ({lo:.0%} → {hi:.0%}) helps novel domains more than "
                          "training domains (gain: novel improvement − train improvement)",
                          g["novel"] - g["train"], noise,
                          f"ensemble improves {g['novel']:+.1%} on novel, {g['train']:+.1%} on train"))
    out += seed_corpus_claims(units, plan, main)
    return out


def seed_corpus_claims(units: Units, plan: Mapping[str, Any], main: Mapping[str, Any] | None
                       ) -> list[dict[str, Any]]:
    train, r = list(plan["train_domains"]), plan["removal_domain"]
    f = f"{plan['main_seed_fraction']:.2f}"
    out = []
    for label, spec in (plan.get("seed_corpora") or {}).items():
        btm, rem = ((units.get(f"btm-f{f}"), units.get(f"removal-{r}")) if spec == "all" else
                    (units.get(f"btm-seed-{label}"), units.get(f"removal-{r}-seed-{label}")))
        seed = "all training domains" if spec == "all" else "+".join(spec)
        noise = main["noise_train"] if main else float("nan")
        d_t = main["dense_train"] if main else float("nan")
        ens = mean_ppl(btm["test"], R.ENSEMBLE_CACHED, train) if btm else float("nan")
        out.append(_claim(f"seed on {seed} ({label}): the ensemble beats dense on training domains",
                          gain(ens, d_t), noise, f"ensemble {ens:.2f} vs dense {d_t:.2f} ppl"))
        up_r = up_o = float("nan")
        if btm and rem:
            up_r, up_o = removal_effect(btm["test"], rem["test"], r, train)
        out.append(_claim(f"seed on {seed} ({label}): removing the {r} expert degrades {r} much "
                          "more than the other domains", up_r - up_o, noise,
                          f"{r} ppl {up_r:+.1%}, others {up_o:+.1%}"))
    return out


def planned_units(plan: Mapping[str, Any]) -> list[str]:
    """Every unit the plan asks for, in the runner's order (Runner.run)."""
    f0 = f"{plan['main_seed_fraction']:.2f}"
    seeds = plan["dense_seeds"]
    per_budget = seeds[:plan.get("crossover_dense_seeds", 1) or len(seeds)]
    out = []
    for s in sorted(plan.get("crossover_fractions", [])):
        out += [f"dense-x{s:g}-s{seed}" for seed in per_budget] + [f"btm-x{s:g}-f{f0}"]
    out += [f"dense-s{seed}" for seed in seeds]
    m = plan["main_seed_fraction"]
    out += [f"btm-f{f:.2f}" for f in sorted(plan["seed_fractions"], key=lambda f: (f != m, abs(f - m)))]
    r = plan["removal_domain"]
    out.append(f"removal-{r}")
    for label, spec in (plan.get("seed_corpora") or {}).items():
        if spec != "all":
            out += [f"btm-seed-{label}", f"removal-{r}-seed-{label}"]
    out += [f"novel-{d}" for d in plan["novel_domains"]]
    return out + (["random-split"] if plan.get("random_split", True) else [])
