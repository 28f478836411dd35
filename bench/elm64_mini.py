"""The 64-domain BTM run in miniature (examples/elm64-mini.yaml) on the local SLURM cluster.

Builds the data, then submits the plan:
  1. a slice of ../shared/corpora (--train-docs / --eval-docs per domain and split);
  2. `btm cluster fit` on the 8 training corpora (K clusters) + `btm cluster assign` of their
     train/valid/test -> <cluster>/{train,valid,test}.jsonl; the 4 novel corpora are copied as is
     (held out: evaluation only);
  3. `btm preprocess` of clusters + novel domains (one tokenizer);
  4. the plan with this run's folders -> `btm run PLAN --executor slurm` (resumable: run again, or
     `btm resume RUN_DIR/elm64.yaml`).
Stage timings go to RUN_DIR/driver.json. --k 4 --cycles N makes the CI twin's plan (tests/pipeline
/test_elm64_ci.py): the first N cycles, each cut to K/N clusters... see plan_for().

  python bench/elm64_mini.py --run-dir /work/runs/elm64            # K = 64, 4 cycles x 16
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

import yaml

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "examples" / "elm64-mini.yaml"
TRAINING = ("bible", "novels", "legal", "dictionary", "biology", "code_c", "code_python", "changelogs")
NOVEL = ("code_perl", "python_docs", "glossary", "debian_docs")


def btm(*args: str, log: Path | None = None, timeout: int = 3600) -> float:
    """Run the CLI of this checkout; returns wall seconds; raises with the output's tail."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *args], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"btm {args[0]} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return time.time() - t0


def slice_corpus(src: Path, dst: Path, domains, counts: dict[str, int]) -> None:
    for d in domains:
        (dst / d).mkdir(parents=True, exist_ok=True)
        for split, n in counts.items():
            with open(src / d / f"{split}.jsonl") as f:
                lines = [line for _, line in zip(range(n), f)]
            (dst / d / f"{split}.jsonl").write_text("".join(lines))


def cluster_names(k: int) -> list[str]:
    return [f"cluster{i:0{len(str(k - 1))}d}" for i in range(k)]


def plan_for(run_dir: Path, data: Path, k: int, ncycles: int, ci: bool = False,
             ntasks_per_expert: int | None = None) -> dict:
    """examples/elm64-mini.yaml with this run's folders and K clusters split over `ncycles`
    cycles; the seed keeps 75 % of (seed + first cycle) at the plan's steps per expert."""
    raw = yaml.safe_load(PLAN.read_text())
    names = cluster_names(k)
    per = k // ncycles
    steps = raw["cycles"][0]["steps"]
    raw.update(run_dir=str(run_dir), data_dir=str(data))
    raw["seed"].update(domains=names, steps=3 * per * steps)
    raw["cycles"] = [{"domains": names[c * per:(c + 1) * per], "steps": steps} for c in range(ncycles)]
    raw["evaluation"]["domains"] = list(NOVEL) + names
    raw["evaluation"]["topk"] = [t for t in raw["evaluation"]["topk"] if t <= k] or [1]
    raw["cluster"]["btm_command"] = f"{sys.executable} -m megatron_btm.cli"
    raw["cluster"]["env_setup"] = raw["cluster"]["env_setup"] + [f"export PYTHONPATH={REPO}"]
    if ci:
        raw["name"] = "elm64ci"
    if ntasks_per_expert is not None:   # the plan trains each expert on 1 rank of its 4 GPUs
        raw["cluster"]["ntasks_per_expert"] = ntasks_per_expert
    return raw


def build_data(work: Path, corpora: Path, k: int, train_docs: int, eval_docs: int, timings: dict) -> Path:
    sl, clusters, corpus, data = work / "slice", work / "clusters", work / "corpus", work / "data"
    if (data / "done").exists():
        return data
    for p in (sl, clusters, corpus, data):
        shutil.rmtree(p, ignore_errors=True)
    counts = {"train": train_docs, "valid": eval_docs, "test": eval_docs}
    slice_corpus(corpora, sl, TRAINING + NOVEL, counts)
    common = ["--corpus", str(sl), "--domains", ",".join(TRAINING), "--no-progress"]
    timings["cluster_fit_s"] = btm("cluster", "fit", *common, "--k", str(k), "--output", str(clusters),
                                   "--sample-docs", "4000", "--seed", "0")
    timings["cluster_assign_s"] = btm("cluster", "assign", *common, "--clusters", str(clusters),
                                      "--output", str(corpus))
    for d in NOVEL:
        shutil.copytree(sl / d, corpus / d)
    timings["preprocess_s"] = btm("preprocess", "--corpus", str(corpus), "--output", str(data),
                                  "--vocab-size", "512", "--tokenizer-train-bytes", "400000",
                                  "--workers", "1", "--no-progress")
    (data / "done").write_text("ok\n")
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="everything the run writes (outside the repo)")
    ap.add_argument("--corpora", type=Path, default=REPO.parent.parent / "shared" / "corpora")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--train-docs", type=int, default=800, help="train documents per corpus")
    ap.add_argument("--eval-docs", type=int, default=400, help="valid and test documents per corpus")
    ap.add_argument("--executor", default="slurm", choices=("slurm", "local", "inprocess"))
    ap.add_argument("--ci", action="store_true", help="name the jobs elm64ci")
    ap.add_argument("--ntasks-per-expert", type=int, default=None,
                    help="ranks per expert job (default: the plan's, 1 of the job's 4 GPUs)")
    a = ap.parse_args(argv)
    if a.k % a.cycles:
        raise SystemExit(f"--k {a.k} must be a multiple of --cycles {a.cycles}")
    corpora = a.corpora if a.corpora.exists() else Path("/work/shared/corpora")
    work = a.run_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    data = build_data(work, corpora, a.k, a.train_docs, a.eval_docs, timings)
    plan = work / "elm64.yaml"
    plan.write_text(yaml.safe_dump(plan_for(work / "run", data, a.k, a.cycles, a.ci,
                                             a.ntasks_per_expert), sort_keys=False))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "run", str(plan), "--executor", a.executor],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    print(out.stdout + out.stderr)
    timings.update(submit_s=time.time() - t0, submitted_at=t0)
    drv = work / "driver.json"
    old = json.loads(drv.read_text()) if drv.exists() else {}
    drv.write_text(json.dumps({**old, **timings}, indent=1))
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
