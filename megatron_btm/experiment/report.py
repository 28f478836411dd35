"""The experiment's report: report.md (tables, claims, compute, environment), results.json and
PNG plots, all computed from OUTPUT/runs/*.json (so a report can be rebuilt without training).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from megatron_btm.experiment import claims as C
from megatron_btm.experiment import report_sweep as RS
from megatron_btm.experiment import sweep as S
from megatron_btm.utils.io import atomic_write_json, atomic_write_text, read_json
from megatron_btm.inference import rows as R

Column = tuple[str, Mapping[str, Any], str]  # (header, {domain: {row: cell}}, row)


PUBLISHED = ("report.md", "results.json", "environment.json", "plan.json", "ppl_by_domain.png",
             "seed_fraction.png", "crossover.png")


def publish(out: str | Path, dest: str | Path) -> list[Path]:
    """Copy the report (markdown, plots, JSON, runs/*.json) — not data or checkpoints — to
    `dest`, e.g. bench/results/<plan> to commit it. Each file is written atomically."""
    from megatron_btm.utils.io import atomic_write_bytes
    out, dest = Path(out), Path(dest)
    files = [out / f for f in PUBLISHED if (out / f).is_file()] + sorted((out / "runs").glob("*.json"))
    if not (out / "report.md").is_file():
        raise FileNotFoundError(f"{out / 'report.md'}: no report to publish (run the plan first)")
    copied = []
    for f in files:
        target = dest / f.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, f.read_bytes())
        copied.append(target)
    return copied


def load_units(out: str | Path) -> dict[str, dict[str, Any]]:
    runs = Path(out) / "runs"
    return {p.stem: read_json(p) for p in sorted(runs.glob("*.json"))} if runs.is_dir() else {}


def _fmt(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.2f}"


def domain_table(columns: list[Column], groups: list[tuple[str, list[str]]]) -> str:
    """Markdown: one line per domain, a token-weighted mean line per group, one column each."""
    head = "| domain | " + " | ".join(c[0] for c in columns) + " |\n|---|" + "---:|" * len(columns)
    lines = [head]
    for label, domains in groups:
        if not domains:
            continue
        for d in domains:
            lines.append(f"| {d} | " + " | ".join(_fmt(C.mean_ppl(t, r, [d])) for _, t, r in columns) + " |")
        lines.append(f"| **mean ({label})** | " + " | ".join(
            f"**{_fmt(C.mean_ppl(t, r, domains))}**" for _, t, r in columns) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:+.2%}"


def render(units: Mapping[str, Mapping[str, Any]], plan: Mapping[str, Any],
           env: Mapping[str, Any], vocab_size: int | None = None) -> tuple[str, dict[str, Any]]:
    """(report markdown, summary dict). Pure: everything comes from the unit records."""
    train, novel = list(plan["train_domains"]), list(plan["novel_domains"])
    groups = [("train", train), ("novel", novel)]
    summary = C.compute_claims(units, plan)
    params = C.num_params(plan["model"], vocab_size) if vocab_size else None
    budgets = S.budget_rows(units, plan, params)
    summary["budgets"] = budgets
    summary["crossover"] = S.measured_crossover(budgets)
    summary["claims"] += S.sweep_claims(units, plan, budgets)
    noise = summary["noise"]
    main_name = f"btm-f{plan['main_seed_fraction']:.2f}"
    main = units.get(main_name, {}).get("test", {})
    dense_units = {s: units[f"dense-s{s}"] for s in plan["dense_seeds"] if f"dense-s{s}" in units}
    dense = C.dense_table(list(dense_units.values()))
    L = [f"# {plan['name']}: Branch-Train-Merge in miniature", "",
         f"Training domains: {', '.join(train)}. Novel domains: {', '.join(novel) or 'none'}.",
         f"Model: GPT {plan['model']['num_layers']}×{plan['model']['hidden_size']} "
         f"({plan['model']['num_attention_heads']} heads), seq {plan['model']['seq_length']}, BPE "
         f"{vocab_size or plan['vocab_size']}" + (f", {C.num_params(plan['model'], vocab_size):,} "
                                                 "parameters" if vocab_size else "") + ".",
         f"Budget of one forest (seed + experts) = dense budget = {plan['total_tokens']:,} tokens; "
         f"main forest at {plan['main_seed_fraction']:.0%} seed compute. Test perplexity, "
         "token-weighted means; cached priors and branch posteriors come from the valid split.",
         _batch_line(plan), "",
         f"**Noise**: the dense baseline's seed-to-seed spread ({len(dense_units)} seeds) is "
         f"{_pct(noise)} of its mean perplexity over the training domains.", "",
         "## Claims", "", "| claim | verdict | gain | gain / noise | numbers |", "|---|---|---:|---:|---|"]
    for c in summary["claims"]:
        L.append(f"| {c['claim']} | **{c['verdict']}** | {_pct(c['gain'])} | "
                 f"{_fmt(c['gain_over_noise'])} | {c['detail']} |")
    L += ["", "Gain: how much lower the claimed-better perplexity is (ppl_other / ppl_claimed − 1); "
          "held = gain above the dense seed noise, within noise = |gain| ≤ noise. For top-k the "
          "gain is minus top-k's loss against the full ensemble, and it holds when the loss is at "
          "most the noise. Nothing here is tuned after the fact: a claim that did not hold is "
          "reported as measured.", ""]
    L += ["## 1. Dense (compute-matched) vs ELMForest ensembles", "",
          domain_table([(f"dense s{s}", u["test"], R.DENSE) for s, u in dense_units.items()]
                       + [("dense (mean)", dense, R.DENSE),
                          ("uniform-prior ensemble", main, R.ENSEMBLE_UNIFORM),
                          ("cached-prior ensemble", main, R.ENSEMBLE_CACHED)], groups),
          "![ppl](ppl_by_domain.png)", "",
          "## 2. Parameter averaging", "",
          domain_table([("dense (mean)", dense, R.DENSE),
                        ("uniform average", main, R.UNIFORM_AVERAGE),
                        ("argmax (top-1 expert)", main, R.ARGMAX_AVERAGE),
                        ("posterior average", main, R.POSTERIOR_AVERAGE),
                        ("ensemble (cached)", main, R.ENSEMBLE_CACHED)], groups),
          "## 3. Top-k ensembles (experts kept by the cached prior)", "",
          domain_table([(f"top-{k}", main, R.topk_row(k)) for k in plan["topk"]]
                       + [("full ensemble", main, R.ENSEMBLE_CACHED)], groups)]
    L += ["## 4. Seed compute fraction", "",
          "| seed fraction | seed tokens | ensemble (train) | posterior avg (train) | "
          "ensemble (novel) | posterior avg (novel) |", "|---:|---:|---:|---:|---:|---:|"]
    for f in sorted(plan["seed_fractions"]):
        u = units.get(f"btm-f{f:.2f}")
        if u is None:
            continue
        t = u["test"]
        L.append(f"| {f:.0%} | {u['compute']['seed_tokens']:,} | "
                 + " | ".join(_fmt(C.mean_ppl(t, r, ds)) for ds in (train, novel)
                              for r in (R.ENSEMBLE_CACHED, R.POSTERIOR_AVERAGE)) + " |")
    L += ["", "![seed fraction](seed_fraction.png)", ""]
    nov = [units[f"novel-{d}"] for d in novel if f"novel-{d}" in units]
    if nov:
        k = plan["branch_k"]
        L += ["## 5. Branching novel-domain experts", "",
              f"Each novel expert trains {nov[0]['tokens']:,} tokens on its domain, from (a) the "
              f"seed or (b) the posterior-weighted top-{k} average of the main forest.", "",
              f"| domain | forest ensemble (no training) | top-{k} average (branch point) | "
              f"branched from seed | branched from top-{k} | top-{k} parents |",
              "|---|---:|---:|---:|---:|---|"]
        for u in nov:
            d, t = u["domain"], u["test"]
            parents = ", ".join(f"{p['id']} {p['weight']:.2f}" for p in u["parents"][f"branch-top{k}"])
            L.append(f"| {d} | {_fmt(C.mean_ppl(main, R.ENSEMBLE_CACHED, [d]))} | "
                     f"{_fmt(C.mean_ppl(t, R.model_row(f'branch-point-top{k}'), [d]))} | "
                     f"{_fmt(C.mean_ppl(t, R.model_row('branch-seed'), [d]))} | "
                     f"{_fmt(C.mean_ppl(t, R.model_row(f'branch-top{k}'), [d]))} | {parents} |")
        L.append("")
    rem = units.get(f"removal-{plan['removal_domain']}")
    if rem is not None:
        r = plan["removal_domain"]
        L += [f"## 6. Removing the {r} expert", "",
              "| domain | ensemble before | after removal | change |", "|---|---:|---:|---:|"]
        for d in train:
            b, a = C.mean_ppl(main, R.ENSEMBLE_CACHED, [d]), C.mean_ppl(rem["test"], R.ENSEMBLE_CACHED, [d])
            L.append(f"| {d}{' (removed)' if d == r else ''} | {_fmt(b)} | {_fmt(a)} | {_pct(a / b - 1)} |")
        if rem.get("descendants"):
            L.append(f"\nExperts descending from {r}: {rem['descendants']} (removal is then not "
                     "complete unlearning).")
        L.append("")
    rs = units.get("random-split")
    if rs is not None:
        L += ["## 7. Ablation: random-split experts (same documents, random split)", "",
              domain_table([("domain experts: cached ens.", main, R.ENSEMBLE_CACHED),
                            ("random split: cached ens.", rs["test"], R.ENSEMBLE_CACHED),
                            ("domain experts: uniform ens.", main, R.ENSEMBLE_UNIFORM),
                            ("random split: uniform ens.", rs["test"], R.ENSEMBLE_UNIFORM)],
                           [("train", train)])]
    L += RS.budget_section(budgets, summary["crossover"], plan)
    L += RS.seed_corpus_section(units, plan, budgets)
    L += ["## What was tried", "",
          f"Seed fractions {', '.join(f'{f:.0%}' for f in plan['seed_fractions'])}; budgets "
          f"{', '.join(f'{c:g}' for c in sorted([1.0] + list(plan.get('crossover_fractions', []))))}"
          f" × total_tokens; top-k for k in {plan['topk']}; novel experts branched from the seed "
          f"and from the posterior top-{plan['branch_k']} average; {len(plan['dense_seeds'])} dense "
          "seeds" + (f"; seed corpora {', '.join(plan['seed_corpora'])}" if plan.get("seed_corpora")
                     else "") + ". Every configuration the plan ran is in the tables above and in "
          "runs/*.json; no result was re-run or selected after seeing the test split (cached priors "
          "and branch posteriors use the valid split).", ""]
    missing = [u for u in S.planned_units(plan) if u not in units]
    if missing:
        L += [f"**Not run** (planned, no result yet; nothing is extrapolated for them): "
              f"{', '.join(missing)}.", ""]
    L += ["## Compute and runs", "", "| run | tokens | batch (sequences per step) | wall s |",
          "|---|---:|---|---:|"]
    for name, u in units.items():
        tok = u.get("compute", {}).get("tokens", u.get("tokens", 0))
        L.append(f"| {name} | {tok:,} | {_unit_batch(u, plan)} | {u.get('seconds', 0):.0f} |")
    L += ["", "## Environment", "", f"- command: `{env.get('command')}`"]
    L += [f"- {k}: {env.get(k)}" for k in ("python", "torch", "megatron-core", "tokenizers",
                                             "git_commit", "git_dirty", "platform", "device", "cpus", "torch_threads",
                                             "started", "finished") if k in env]
    invocations = env.get("invocations") or []
    if len(invocations) > 1:
        L += ["", "Invocations (the run was resumed; units that a later invocation found finished were "
              "not re-run):", "", "| started | git commit | dirty | units run |", "|---|---|---|---|"]
        for inv in invocations:
            units = inv.get("units")
            L.append(f"| {inv.get('started')} | {str(inv.get('git_commit'))[:12]} | {inv.get('git_dirty')} | "
                     f"{', '.join(units) if units else ('-' if units is not None else 'not recorded')} |")
    elif env.get("commands"):
        L.append(f"- all invocations (resumed): {env['commands']}")
    return "\n".join(L) + "\n", summary


def _expert_batch(plan: Mapping[str, Any]) -> int:
    return plan.get("expert_global_batch_size") or plan["global_batch_size"]


def _batch_line(plan: Mapping[str, Any]) -> str:
    """How compute is matched: the batch of dense / seed and of the experts."""
    b, be = plan["global_batch_size"], _expert_batch(plan)
    if be == b:
        return (f"Every run trains with {b} sequences per step; an expert makes 1/n of the "
                "updates the dense model makes after the seed phase.")
    return (f"Dense and seed train with {b} sequences per step, every expert with {be}, so an "
            f"expert sees its 1/n of the tokens in {b // be}× as many steps (the paper's GPU-time "
            f"matching gives an expert the dense batch / n: {b}/{len(plan['train_domains'])}).")


def _unit_batch(u: Mapping[str, Any], plan: Mapping[str, Any]) -> str:
    b, be = plan["global_batch_size"], _expert_batch(plan)
    kind = u.get("kind")
    if kind == "dense":
        return str(b)
    if kind == "removal":
        return "–"   # no training
    if kind == "btm" and u.get("compute", {}).get("seed_tokens"):
        return f"seed {b}, experts {be}"
    return f"experts {be}"   # random split, novel experts, a 0 % seed (random init)


def _plain_log_axis(ax) -> None:
    from matplotlib.ticker import LogLocator, ScalarFormatter
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter("")  # only the labelled major ticks


def plot_bars(columns: list[Column], domains: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(domains) + 2), 4.2))
    for i, (label, table, row) in enumerate(columns):
        ax.bar([x + i * width for x in range(len(domains))],
               [C.mean_ppl(table, row, [d]) for d in domains], width, label=label,
               color=plt.cm.tab10(i % 10))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(domains))], domains, rotation=30, ha="right")
    _plain_log_axis(ax)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(summary: Mapping[str, Any], units, plan, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = plan["train_domains"]
    fracs = sorted(f for f in plan["seed_fractions"] if f"btm-f{f:.2f}" in units)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for row, label in ((R.ENSEMBLE_CACHED, "ensemble (cached prior)"),
                       (R.POSTERIOR_AVERAGE, "posterior average")):
        ax.plot(fracs, [C.mean_ppl(units[f"btm-f{f:.2f}"]["test"], row, train) for f in fracs],
                "o-", label=label)
    ax.axhline(summary["dense_ppl_train"], color="k", ls="--", label="dense (compute-matched)")
    ax.set_xlabel("seed compute fraction")
    ax.set_ylabel("mean test ppl, training domains")
    _plain_log_axis(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str | Path, *, plan: Mapping[str, Any], environment: Mapping[str, Any]
                 ) -> dict[str, Any]:
    out = Path(out)
    units = load_units(out)
    vocab = None
    if (out / "data" / "tokenizer.json").is_file():
        from megatron_btm.data.tokenizer import load_tokenizer
        vocab = load_tokenizer(out / "data" / "tokenizer.json").vocab_size
    text, summary = render(units, plan, environment, vocab)
    main = units.get(f"btm-f{plan['main_seed_fraction']:.2f}", {}).get("test", {})
    dense = C.dense_table([units[f"dense-s{s}"] for s in plan["dense_seeds"] if f"dense-s{s}" in units])
    domains = list(plan["train_domains"]) + list(plan["novel_domains"])
    if main or dense:  # an output holding only some units (btm experiment --only) may have neither
        plot_bars([("dense (mean of seeds)", dense, R.DENSE),
                   ("uniform-prior ensemble", main, R.ENSEMBLE_UNIFORM),
                   ("cached-prior ensemble", main, R.ENSEMBLE_CACHED),
                   ("posterior average", main, R.POSTERIOR_AVERAGE)],
                  domains, out / "ppl_by_domain.png", "Per-domain test perplexity")
    if summary.get("sweep") and dense:
        plot_sweep(summary, units, plan, out / "seed_fraction.png")
    if len(summary["budgets"]) >= 2:
        RS.plot_budgets(summary["budgets"], out / "crossover.png")
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "results.json", {"plan": dict(plan), "environment": dict(environment),
                                             "summary": summary, "units": units})
    return summary
