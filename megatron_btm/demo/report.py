"""The demo's outputs: a perplexity table (JSON + markdown), two plots, a short report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_btm.inference.tables import mean_ppl


def table_rows(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Row names in first-seen order over domains."""
    rows: list[str] = []
    for per_domain in table.values():
        rows += [r for r in per_domain if r not in rows]
    return rows


DENSE, ENSEMBLE, POSTERIOR_AVG, UNIFORM_AVG = ("dense (compute-matched)", "cached-prior ensemble",
                                              "posterior average", "uniform average")
REGIME = ("In the valid-split sweep that chose these defaults (bench/results/demo-embedded/sweep.md), "
          "a 2x64 model puts the ensemble level with dense at a 75% seed share (+0.3% at 300 steps, "
          "+1.3% at 1,200) and behind it at 50% (-10.9% at 300, -10.0% at 600), and wider or deeper "
          "models put it 25-41% behind: at demo budgets the experts' few steps cannot make up for dense's "
          "(bench/results/paper-mini-sweep/report.md: at 99k parameters no crossover up to 6.6 "
          "tokens per parameter either).")


def explanation(table, domains: list[str]) -> str:
    """Two sentences: what this table shows (from its numbers), and the regime (the sweep)."""
    m = {row: mean_ppl(table, row, domains) for row in (DENSE, ENSEMBLE, POSTERIOR_AVG, UNIFORM_AVG)}

    def vs(a, b):
        gain = m[b] / m[a] - 1
        return f"{'beats' if gain > 0 else 'trails'} {b} by {abs(gain):.1%} ({m[a]:.2f} vs {m[b]:.2f})"
    own = sum(1 for d in domains if f"expert/{d}" in table.get(d, {}) and min(
        (r for r in table[d] if r.startswith("expert/")), key=lambda r: table[d][r]["ppl"]) == f"expert/{d}")
    return (f"On this run the {ENSEMBLE} {vs(ENSEMBLE, DENSE)} in mean perplexity, and the "
            f"{POSTERIOR_AVG} {vs(POSTERIOR_AVG, DENSE)} and {vs(POSTERIOR_AVG, UNIFORM_AVG)}; a "
            f"domain's own expert is the best expert on it in {own} of {len(domains)} domains, so "
            f"removing an expert costs mainly its domain. {REGIME}")


def markdown_table(table, domains: list[str]) -> str:
    rows = table_rows(table)
    head = "| model | " + " | ".join(domains) + " | mean |\n|---|" + "---:|" * (len(domains) + 1) + "\n"
    lines = []
    for row in rows:
        cells = []
        for d in domains:
            cell = table.get(d, {}).get(row)
            cells.append(f"{cell['ppl']:.2f}" if cell else "–")
        cells.append(f"{mean_ppl(table, row, domains):.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot_perplexities(table, domains: list[str], path: Path, rows: list[str] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = rows or table_rows(table)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains) + 2), 4.2))
    for i, row in enumerate(rows):
        values = [table.get(d, {}).get(row, {}).get("ppl", float("nan")) for d in domains]
        ax.bar([x + i * width for x in range(len(domains))], values, width, label=row,
               color=plt.cm.tab20(i % 20))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(domains))], domains)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Per-domain perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_posterior_heatmap(priors: dict[str, list[float]], expert_ids: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    domains = list(priors)
    fig, ax = plt.subplots(figsize=(1.0 * len(expert_ids) + 2.5, 0.6 * len(domains) + 1.8))
    data = [priors[d] for d in domains]
    im = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(expert_ids)), expert_ids, rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("target domain")
    ax.set_title("Cached domain posterior π")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(path: Path, *, table, domains: list[str], priors, expert_ids, summary: dict[str, Any]) -> str:
    lines = ["# megatron-btm demo", "",
             f"Corpus: {summary['corpus']} — domains: {', '.join(domains)}.",
             f"Model: {summary['model']}. Compute: seed {summary['seed_tokens']:,} tokens "
             f"({summary['seed_fraction']:.0%}), experts {summary['expert_tokens']:,} tokens in all, "
             f"dense baseline {summary['dense_tokens']:,} tokens (compute-matched).",
             f"Wall time: {summary['seconds']:.0f} s.", "",
             "## Test perplexity", "", explanation(table, domains), "", markdown_table(table, domains),
             "Rows: *dense* is one model trained on the balanced mixture with the same total tokens; "
             "*expert:d* one expert alone; ensembles mix all experts with the domain posterior "
             "updated over the prefix, starting from a uniform or the cached prior; *top-k* keeps the "
             "k experts with the largest cached prior; *averages* are single models with averaged "
             "parameters (uniform, or weighted by the target domain's cached prior).", "",
             "## Cached domain posterior", "",
             "| domain | " + " | ".join(expert_ids) + " |", "|---|" + "---:|" * len(expert_ids)]
    for d, row in priors.items():
        lines.append(f"| {d} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "![perplexity](ppl_by_domain.png)", "", "![posterior](posterior_heatmap.png)", ""]
    text = "\n".join(lines)
    from megatron_btm.utils.io import atomic_write_text
    atomic_write_text(path, text)
    return text
