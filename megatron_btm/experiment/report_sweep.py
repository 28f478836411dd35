"""Report sections of the budget sweep (verdicts per budget, the measured crossover) and of the
seed-corpus comparison; pure functions of the unit records plus the crossover plot."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from megatron_btm.experiment import sweep as S
from megatron_btm.inference import rows as R
from megatron_btm.inference.tables import mean_ppl


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:+.2%}"


def _cell(c: Mapping[str, Any]) -> str:
    return "not run" if math.isnan(c["gain"]) else f"{_pct(c['gain'])} ({c['verdict']})"


def budget_section(rows: list[Mapping[str, Any]], cross: Mapping[str, Any],
                   plan: Mapping[str, Any]) -> list[str]:
    scales = sorted([1.0] + list(plan.get("crossover_fractions", [])))
    L = ["## Budget sweep: each claim at each budget", "",
         f"All at {plan['main_seed_fraction']:.0%} seed compute; dense = mean of the budget's "
         "dense seeds; each verdict against the seed noise of its own budget (train domains; "
         "novel-domain rows against the dense spread on novel domains).", "",
         "| budget | dense tokens | tokens / param | dense seeds | noise (train) | noise (novel) | "
         "dense ppl (train) | ensemble vs dense | posterior avg vs dense | argmax vs dense (train) | "
         "dense vs argmax (novel) |", "|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        L.append(f"| ×{r['scale']:g} | {r['dense_tokens']:,} | {r['tokens_per_param']:.2f} | "
                 f"{r['dense_seeds']} | {_pct(r['noise_train'])} | {_pct(r['noise_novel'])} | "
                 f"{r['dense_train']:.2f} | " + " | ".join(
                     _cell(r[k]) for k in ("ensemble", "posterior", "argmax_train", "argmax_novel")) + " |")
    missing = [s for s in scales if s not in {r["scale"] for r in rows if not math.isnan(r["ensemble"]["gain"])}]
    if missing:
        L += ["", "Not run (by the time of this report): budgets " + ", ".join(
            f"×{s:g}" for s in missing) + " (no dense run, or no forest, at that budget)."]
    held, sign = cross["held_between"], cross["sign_between"]
    head = "**Crossover (measured between run budgets, not extrapolated)**: "
    if len(cross["budgets"]) < 2:
        L += ["", head + f"fewer than two budgets have both dense runs and a forest "
              f"({len(cross['budgets'])} so far): no crossover measured.", ""]
    else:
        L += ["", head + (
            f"the ensemble's gain over dense turns positive between {sign[0]:.2f} and {sign[1]:.2f} "
            "dense tokens per parameter" if sign else "the gain does not turn from negative to "
            "positive between two run budgets") + "; " + (
            f"it first exceeds the seed noise (held) between {held[0]:.2f} and {held[1]:.2f}."
            if held else ("it is held at every run budget." if cross["held_at_all_run_budgets"] else
                          "it does not turn to held between two run budgets (crossover not reached "
                          "within the run budgets).")), ""]
    if len(rows) >= 2:
        L += ["![crossover](crossover.png)", ""]
    return L


def seed_corpus_section(units: Mapping[str, Mapping[str, Any]], plan: Mapping[str, Any],
                        rows: list[Mapping[str, Any]]) -> list[str]:
    corpora = plan.get("seed_corpora") or {}
    if not corpora:
        return []
    train, r = list(plan["train_domains"]), plan["removal_domain"]
    f = f"{plan['main_seed_fraction']:.2f}"
    main = next((x for x in rows if x["scale"] == 1.0), None)
    L = ["## Seed corpus", "",
         f"At {plan['main_seed_fraction']:.0%} seed compute and the main budget, the seed trains "
         "on the listed domains, then the same cycle (one expert per training domain) and the "
         f"removal of the {r} expert follow.", "",
         f"| seed corpus | seed domains | ensemble (train) | dense (train) | gain | {r} after "
         "removal | others after removal |", "|---|---|---:|---:|---:|---:|---:|"]
    for label, spec in corpora.items():
        key = ("btm-f" + f, f"removal-{r}") if spec == "all" else \
            (f"btm-seed-{label}", f"removal-{r}-seed-{label}")
        btm, rem = units.get(key[0]), units.get(key[1])
        seed = "all" if spec == "all" else ", ".join(spec)
        if btm is None:
            L.append(f"| {label} | {seed} | not run | | | | |")
            continue
        ens = mean_ppl(btm["test"], R.ENSEMBLE_CACHED, train)
        d = main["dense_train"] if main else float("nan")
        up = S.removal_effect(btm["test"], rem["test"], r, train) if rem else (float("nan"),) * 2
        L.append(f"| {label} | {seed} | {ens:.2f} | {d:.2f} | {_pct(d / ens - 1)} | "
                 f"{_pct(up[0])} | {_pct(up[1])} |")
    return L + [""]


def plot_budgets(rows: list[Mapping[str, Any]], path: Path) -> None:
    """Ensemble and posterior-average gain over dense by tokens per parameter, ± seed noise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.8, 3.9))
    xs = [r["tokens_per_param"] for r in rows]
    for key, label in (("ensemble", "ensemble (cached prior)"), ("posterior", "posterior average")):
        ax.plot(xs, [100 * r[key]["gain"] for r in rows], "o-", label=label)
    noise = [100 * (r["noise_train"] if not math.isnan(r["noise_train"]) else 0) for r in rows]
    ax.fill_between(xs, [-n for n in noise], noise, color="0.85", label="dense seed noise")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("dense tokens per parameter (run budgets)")
    ax.set_ylabel("gain over dense, train domains (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
