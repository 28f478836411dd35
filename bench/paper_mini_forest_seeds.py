"""The forests' own seed spread next to the dense seed spread, at paper-mini-sweep2's largest
budget: the main forest (forest_seed 1234, in the sweep's output) and the same unit re-run with
forest_seed 4321 and 2718 in outputs of their own (`btm experiment ... --set forest_seed=S --only
btm-f0.50`). Test split, token-weighted mean perplexity (inference.tables.mean_ppl), training and
novel domains; noise = max / min - 1 over seeds, as the experiment's claims use.

    python bench/paper_mini_forest_seeds.py --runs /work/runs/headline \
        --out bench/results/paper-mini-sweep2/forest_seeds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_btm.inference.tables import mean_ppl
from megatron_btm.utils.io import atomic_write_json, atomic_write_text

OUTPUTS = {1234: "sweep2", 4321: "sweep2-fs4321", 2718: "sweep2-fs2718"}
ROWS = ("ensemble/cached", "model/posterior-average")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    plan = json.loads((a.runs / "sweep2" / "plan.json").read_text())
    kinds = {"train": plan["train_domains"], "novel": plan["novel_domains"]}
    res = {"dense": {}, "forest": {}}
    for s in plan["dense_seeds"]:
        t = json.loads((a.runs / "sweep2" / "runs" / f"dense-s{s}.json").read_text())["test"]
        res["dense"][s] = {k: mean_ppl(t, "model/dense", doms) for k, doms in kinds.items()}
    for s, out in OUTPUTS.items():
        t = json.loads((a.runs / out / "runs" / "btm-f0.50.json").read_text())["test"]
        res["forest"][s] = {f"{row} {k}": mean_ppl(t, row, doms) for row in ROWS for k, doms in kinds.items()}

    def noise(vals):
        return max(vals) / min(vals) - 1
    lines = ["# paper-mini-sweep2 at x1 (9.93 dense tokens per parameter): forest seeds vs dense seeds",
             "", "Test split, token-weighted mean ppl. Command: `python bench/paper_mini_forest_seeds.py "
             "--runs /work/runs/headline --out bench/results/paper-mini-sweep2/forest_seeds`.", "",
             "| seed | dense (train) | dense (novel) | ensemble (train) | ensemble (novel) | "
             "posterior avg (train) | posterior avg (novel) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in plan["dense_seeds"]:
        d, f = res["dense"][s], res["forest"][s]
        lines.append(f"| {s} | {d['train']:.2f} | {d['novel']:.2f} | {f['ensemble/cached train']:.2f} | "
                     f"{f['ensemble/cached novel']:.2f} | {f['model/posterior-average train']:.2f} | "
                     f"{f['model/posterior-average novel']:.2f} |")
    summ = {"dense_noise_train": noise([v["train"] for v in res["dense"].values()]),
            "forest_noise_train": noise([v["ensemble/cached train"] for v in res["forest"].values()]),
            "best_dense_train": min(v["train"] for v in res["dense"].values()),
            "best_ensemble_train": min(v["ensemble/cached train"] for v in res["forest"].values()),
            "worst_dense_train": max(v["train"] for v in res["dense"].values()),
            "worst_ensemble_train": max(v["ensemble/cached train"] for v in res["forest"].values())}
    res["summary"] = summ
    lines += ["", f"Seed spread (max/min - 1, train): dense {summ['dense_noise_train']:.1%}, cached-prior "
              f"ensemble {summ['forest_noise_train']:.1%}. Best seed: dense {summ['best_dense_train']:.2f} vs "
              f"ensemble {summ['best_ensemble_train']:.2f}; worst seed: dense {summ['worst_dense_train']:.2f} vs "
              f"ensemble {summ['worst_ensemble_train']:.2f}.", ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out.with_suffix(".json"), res)
    atomic_write_text(a.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
