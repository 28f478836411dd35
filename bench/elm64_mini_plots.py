"""PNG plots of the elm64-mini report (bench/results/elm64-mini/):

  rows.png     mean test perplexity per row (the report's Results table), novel domains and clusters;
  tsweep.png   the cluster router's temperature sweep on valid (bench/elm64_mini_tsweep.py), the
               chosen T marked, the uniform ensemble for reference;
  compare.png  clustered vs provenance domains at equal compute (bench/elm64_mini_compare.py).
Each plot is drawn only when its JSON exists.

  python bench/elm64_mini_plots.py --run-dir /work/runs/elm64 --extra-dir /work/runs/elm64-extra
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elm64_mini import NOVEL, REPO  # noqa: E402
from elm64_mini_eval import mean_row  # noqa: E402

OUT = REPO / "bench" / "results" / "elm64-mini"
ROWS = [("dense seed 0", "model/dense0"), ("dense seed 1", "model/dense1"),
        ("ensemble, uniform", "ensemble/uniform"), ("ensemble, cached prior", "ensemble/cached"),
        ("top-1 / doc", "top1/doc"), ("top-2 / doc", "top2/doc"), ("top-8 / doc", "top8/doc"),
        ("top-1 / token", "top1/token"), ("top-2 / token", "top2/token"), ("top-8 / token", "top8/token"),
        ("ensemble, cluster (T=0.1)", "ensemble/cluster"), ("top-1 / cluster", "top1/cluster"),
        ("top-2 / cluster", "top2/cluster"), ("top-8 / cluster", "top8/cluster")]


def rows_plot(work: Path, path: Path) -> None:
    tab = json.loads((work / "eval-main.json").read_text())
    novel = [d for d in tab["results"] if d in NOVEL]
    clus = [d for d in tab["results"] if d not in NOVEL]
    labels = [lab for lab, _ in ROWS]
    vals = {"novel (4)": [mean_row(tab, r, novel) for _, r in ROWS],
            "clusters (8)": [mean_row(tab, r, clus) for _, r in ROWS]}
    own = sum(tab["results"][d][f"expert/{d}"]["ppl"] for d in clus) / len(clus)
    avg = [json.loads(p.read_text()) for p in sorted(work.glob("eval-avg-*.json"))]
    labels += ["own expert alone", "posterior average"]
    vals["clusters (8)"] += [own, float("nan")]
    vals["novel (4)"] += [float("nan"), (sum(t["results"][d]["model/posterior-avg"]["ppl"]
                                             for t in avg for d in t["results"]) / len(avg)) if avg else float("nan")]
    fig, ax = plt.subplots(figsize=(8, 7))
    y = range(len(labels))
    for i, (name, v) in enumerate(vals.items()):
        ax.barh([j + (i - 0.5) * 0.4 for j in y], v, height=0.4, label=name)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlim(100, None)
    ax.set_xlabel("mean test perplexity (lower is better)")
    ax.set_title("elm64-mini: 64 experts x 4 steps vs dense (448 steps), test split")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tsweep_plot(sweep: dict, path: Path) -> None:
    temps = sorted(sweep["valid"], key=float)
    xs = [float(t) for t in temps]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, part in zip(axes, ("novel", "clusters")):
        for row in ("ensemble/cluster", "top1/cluster", "top2/cluster", "top8/cluster"):
            ax.plot(xs, [sweep["valid"][t][row][part] for t in temps], marker="o", label=row)
        ax.axhline(sweep["valid"][temps[0]]["ensemble/uniform"][part], color="grey", ls="--",
                   label="ensemble/uniform (posterior updating)")
        ax.axvline(sweep["chosen_T"], color="k", ls=":", label=f"chosen T = {sweep['chosen_T']:g}")
        ax.set_xscale("log")
        ax.set_xlabel("cluster temperature T")
        ax.set_title(f"{part}: valid split")
    axes[0].set_ylabel("mean perplexity")
    axes[1].legend(fontsize=8)
    fig.suptitle("cluster routing w ∝ exp(−d/T): temperature swept on valid")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_plot(cmp: dict, path: Path) -> None:
    parts = [(k, t) for k, t in (("mean_ppl", "test docs by provenance"),
                                  ("mean_ppl_on_clusters", "the same docs by cluster")) if cmp.get(k)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], parts):
        arms = list(cmp[key])
        rows = [r for r in cmp[key][arms[0]] if all(r in cmp[key][a] for a in arms)]
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            lab = ("provenance" if arm.startswith("prov") else "K = 8 clusters") + arm[4:]
            ax.barh([j + (i - (len(arms) - 1) / 2) * width for j in range(len(rows))],
                    [cmp[key][arm][r] for r in rows], height=width, label=lab)
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_xlim(min(min(v.values()) for v in cmp[key].values()) * 0.9, None)
        ax.set_xlabel("mean test perplexity (8 splits)")
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"equal compute: 8 experts x {cmp['steps_per_expert']} steps from the same seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--extra-dir", type=Path, default=None)
    a = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    rows_plot(a.run_dir, OUT / "rows.png")
    done = ["rows.png"]
    for name, fn in (("tsweep", tsweep_plot), ("compare", compare_plot)):
        f = a.extra_dir / f"{name}.json" if a.extra_dir else None
        if f is not None and f.exists():
            fn(json.loads(f.read_text()), OUT / f"{name}.png")
            done.append(f"{name}.png")
    print("wrote", ", ".join(str(OUT / d) for d in done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
