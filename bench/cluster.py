"""Benchmark: c-BTM clustering of the 8 training corpora (K = 8), purity against provenance.

For each balancing mode (documents: c-BTM; bytes: our extension) runs, each in its own
subprocess with wall time and peak RSS (os.wait4's ru_maxrss):

    btm cluster fit --corpus CORPORA --domains <8 training domains> --k 8 --balance MODE
    btm cluster assign --clusters ... --corpus CORPORA --domains ... (train, valid, test)

and writes report.json + report.md (+ the two heatmaps) next to this file. Purity is a number
reported here, not a threshold anywhere.

    .venv/bin/python bench/cluster.py [--corpora ../shared/corpora] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results" / "cluster"
REPO = HERE.parents[2]
TRAIN_DOMAINS = ["bible", "novels", "legal", "dictionary", "biology", "code_c", "code_python",
                 "changelogs"]


def timed(cmd: list[str]) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "stdout": out.strip()}


def assignment_quality(clusters: Path, corpora: str, trials: int = 4, batch: int = 512) -> list:
    """Cost of our balanced assignment (and of its greedy pass alone) over the exact optimum
    (scipy's linear_sum_assignment, each cluster as batch/K slots) on batches of valid docs."""
    import itertools

    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from megatron_btm.cluster.artefact import load_clusters
    from megatron_btm.cluster.kmeans import balanced_assign, size_bounds
    from megatron_btm.data import jsonl
    model = load_clusters(clusters)
    texts = [t for d in TRAIN_DOMAINS for t in itertools.islice(
        jsonl.iter_texts(Path(corpora) / d / "valid.jsonl"), 300)]
    X = model.featurizer.embed(texts)
    rng, K, rows = np.random.default_rng(0), model.k, []
    for _ in range(trials):
        d = model.distances(X[rng.choice(len(X), batch, replace=False)])
        lo, hi = size_bounds(batch, K, 0.0)
        slots = np.repeat(d, batch // K, axis=1)
        r, c = linear_sum_assignment(slots)
        opt = float(slots[r, c].sum())
        cost = {name: float(d[np.arange(batch), balanced_assign(d, lo, hi, sweeps=sw)].sum())
                for name, sw in (("priced", 30), ("greedy_only", 0))}
        rows.append({"optimum": opt, "priced_over_optimum": cost["priced"] / opt,
                     "greedy_only_over_optimum": cost["greedy_only"] / opt,
                     "nearest_unconstrained_over_optimum": float(d.min(axis=1).sum()) / opt})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora"))
    ap.add_argument("--work", default="/tmp/btm-bench-cluster")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite report.md from the existing report.json")
    args = ap.parse_args()
    if args.markdown_only:
        (HERE / "report.md").write_text(markdown(json.loads((HERE / "report.json").read_text())))
        return
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    btm = [sys.executable, "-m", "megatron_btm.cli", "cluster"]
    domains = ",".join(TRAIN_DOMAINS)
    results = {}
    for mode in ("documents", "bytes"):
        clusters, assigned = work / f"clusters-{mode}", work / f"assigned-{mode}"
        fit = timed(btm + ["fit", "--corpus", args.corpora, "--domains", domains, "--k",
                           str(args.k), "--balance", mode, "--seed", str(args.seed),
                           "--output", str(clusters), "--no-progress"])
        asg = timed(btm + ["assign", "--clusters", str(clusters), "--corpus", args.corpora,
                           "--domains", domains, "--output", str(assigned), "--no-progress"])
        meta = json.loads((clusters / "clusters.json").read_text())
        rep = json.loads((assigned / "report.json").read_text())
        shutil.copy(assigned / "heatmap.png", HERE / f"heatmap_{mode}.png")
        results[mode] = {
            "fit": fit, "assign": asg, "fit_meta": meta["meta"],
            "artefact_mib": round(sum(p.stat().st_size for p in clusters.iterdir()) / 2**20, 1),
            "purity": rep["purity"], "purity_bytes": rep["purity_bytes"],
            "purity_by_split": {s: v["purity"] for s, v in rep["splits"].items()},
            "sizes": rep["sizes"], "bytes": rep["bytes"],
            "train_counts": rep["splits"]["train"]["counts"],
            "train_byte_counts": rep["splits"]["train"]["byte_counts"], "clusters": rep["clusters"],
            "domains": rep["domains"], "table_md": (assigned / "report.md").read_text()}
    quality = assignment_quality(work / "clusters-documents", args.corpora)
    docs = results["documents"]["fit_meta"]["documents_per_domain"]
    out = {"k": args.k, "seed": args.seed, "domains": TRAIN_DOMAINS, "corpora": args.corpora,
           "documents_per_domain": docs,
           "one_cluster_baseline_purity": max(docs.values()) / sum(docs.values()),
           "runs": results, "assignment_quality_512_docs_k8": quality,
           "note": "timings on a 2-core machine shared with other sessions (under load)"}
    (HERE / "report.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    (HERE / "report.md").write_text(markdown(out))
    print(f"{'balance':<10} {'purity':>7} {'bytes':>7} {'fit s':>7} {'fit MiB':>8} "
          f"{'assign s':>9} {'assign MiB':>11}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['purity']:>7.3f} {r['purity_bytes']:>7.3f} {r['fit']['seconds']:>7} "
              f"{r['fit']['peak_rss_mib']:>8} {r['assign']['seconds']:>9} "
              f"{r['assign']['peak_rss_mib']:>11}")


def shares(domains: list[str], row: list[int]) -> str:
    total = sum(row) or 1
    return ", ".join(f"{d} {c / total:.0%}" for d, c in sorted(zip(domains, row), key=lambda x: -x[1])
                     if c / total >= 0.05)


def markdown(out: dict) -> str:
    lines = [f"# c-BTM clustering of the {len(out['domains'])} training corpora, K = {out['k']}",
             "", "Generated by `bench/results/cluster/run.py` (seed "
             f"{out['seed']}); {out['note']}.", "",
             "Purity: the fraction of documents (bytes: of text bytes) whose cluster's majority "
             "provenance is their own, over train + valid + test assigned by nearest centroid.",
             f"One cluster for everything would score {out['one_cluster_baseline_purity']:.3f} "
             "(biology's share of the documents).", "",
             "| balance | purity (docs) | purity (bytes) | train / valid / test | fit s (CPU s) | "
             "fit peak RSS MiB | assign s (CPU s) | assign peak RSS MiB | iterations (converged; "
             "labels changed in the last) | artefact MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in sorted(out["runs"].items(), key=lambda m: m[0] != "documents"):
        ps = " / ".join(f"{r['purity_by_split'][s]:.3f}" for s in ("train", "valid", "test"))
        lines.append(f"| {mode} | {r['purity']:.3f} | {r['purity_bytes']:.3f} | {ps} | "
                     f"{r['fit']['seconds']} ({r['fit']['cpu_seconds']}) | {r['fit']['peak_rss_mib']} | "
                     f"{r['assign']['seconds']} ({r['assign']['cpu_seconds']}) | "
                     f"{r['assign']['peak_rss_mib']} | {r['fit_meta']['iterations']} "
                     f"({r['fit_meta']['converged']}; {r['fit_meta']['changed_last_iteration']}) | "
                     f"{r['artefact_mib']} |")
    q = out["assignment_quality_512_docs_k8"]
    lines += ["", "Balanced assignment vs the exact optimum (scipy linear_sum_assignment), "
              f"{len(q)} batches of 512 valid documents, K = {out['k']}, equal sizes: cost ratio "
              "ours (dual prices + greedy) " + ", ".join(f"{r['priced_over_optimum']:.4f}" for r in q)
              + "; greedy pass alone " + ", ".join(f"{r['greedy_only_over_optimum']:.4f}" for r in q)
              + "; unconstrained nearest centroid (a lower bound) "
              + ", ".join(f"{r['nearest_unconstrained_over_optimum']:.4f}" for r in q) + "."]
    lines += ["", "documents: every cluster holds the same number of documents (c-BTM). bytes: the "
              "same number of text bytes (k-means over bytes: byte-weighted centroids, the "
              "vocabulary/SVD sample drawn by bytes). The fit's own balanced labels are in "
              "report.json (runs.*.fit_meta); the tables below are the nearest-centroid "
              "assignment of `btm cluster assign`."]
    lines += ["", "Documents per training domain: " + ", ".join(
        f"{d} {n}" for d, n in out["documents_per_domain"].items()), ""]
    for mode, r in sorted(out["runs"].items(), key=lambda m: m[0] != "documents"):
        lines += [f"## balance = {mode}", "", "Which domains make up each cluster (train split; "
                  "domains with >= 5% of the cluster's documents, resp. bytes):", ""]
        for name, docs, nbytes in zip(r["clusters"], r["train_counts"], r["train_byte_counts"]):
            lines.append(f"- {name}: {sum(docs)} docs ({shares(r['domains'], docs)}); "
                         f"{sum(nbytes) / 2**20:.1f} MiB ({shares(r['domains'], nbytes)})")
        lines += ["", r["table_md"].split("\n", 2)[2].strip(), "", f"![heatmap](heatmap_{mode}.png)", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
