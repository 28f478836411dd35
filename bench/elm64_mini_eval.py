"""After the elm64-mini run (bench/elm64_mini.py): the rest of the report's evaluation.

  dense    the dense baseline with the same training tokens (seed steps + every expert's steps,
           the plan's training config, the same global batch) on the mixture of all clusters,
           one run per --dense-seeds seed (the seed noise);
  priors   `btm prior` (cached prior, valid split) for the evaluated domains;
  average  `btm average --method posterior` per novel domain (the posterior-weighted average);
  eval     `btm eval`: experts, uniform and cached-prior ensembles, top-1/2/8 of the cached prior
           (doc) and of the posterior (token), the averages and the dense models;

  python bench/elm64_mini_eval.py --run-dir /work/runs/elm64 [--steps dense,priors,average,eval]
  python bench/elm64_mini_eval.py --run-dir /work/runs/elm64 --out-dir /work/runs/elm64-extra \
      --steps eval --split valid --cluster-temperature 0.03      # one `btm eval` at another T
The temperature sweep (valid, then the chosen T on test) is bench/elm64_mini_tsweep.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elm64_mini import NOVEL, REPO, btm  # noqa: E402

OUT = REPO / "bench" / "results" / "elm64-mini"


def _plan(work: Path) -> dict:
    return yaml.safe_load((work / "elm64.yaml").read_text())


def eval_domains(plan: dict, nclusters: int) -> list[str]:
    names = plan["seed"]["domains"]
    step = max(1, len(names) // nclusters)
    return list(NOVEL) + names[::step][:nclusters]


def dense(work: Path, plan: dict, seeds: list[int], t: dict) -> None:
    steps = plan["seed"]["steps"] + sum(c["steps"] * len(c["domains"]) for c in plan["cycles"])
    for s in seeds:
        out = work / "dense" / f"seed{s}"
        t[f"dense_seed{s}_s"] = btm("train-seed", "--config", str(work / "elm64.yaml"), "--data", plan["data_dir"],
                                    "--output", str(out), "--domains", ",".join(plan["seed"]["domains"]),
                                    "--set", f"steps={steps}", "--set", f"seed={1234 + s}", "--no-progress")
    t["dense_steps"] = steps


def priors(work: Path, plan: dict, doms: list[str], t: dict) -> None:
    t["priors_s"] = btm("prior", "--forest", f"{plan['run_dir']}/forest", "--data", plan["data_dir"],
                        "--domains", ",".join(doms), "--split", "valid", "--num-sequences", "8",
                        "--no-progress", "--output", str(work / "priors"))


def average(work: Path, plan: dict, t: dict) -> None:
    t0 = time.time()
    for d in NOVEL:
        btm("average", "--forest", f"{plan['run_dir']}/forest", "--method", "posterior", "--prior",
            str(work / "priors" / f"{d}.json"), "--output", str(work / "avg" / d), "--overwrite", "--no-progress")
    t["average_s"] = time.time() - t0


def _common(plan: dict, split: str) -> list[str]:
    return ["--forest", f"{plan['run_dir']}/forest", "--data", plan["data_dir"], "--split", split,
            "--max-blocks", str(plan["evaluation"]["max_blocks"]), "--no-progress", "--overwrite"]


def evaluate(work: Path, out: Path, plan: dict, doms: list[str], seeds: list[int], t: dict,
             split: str = "test", temperature: float = 0.1) -> None:
    dense_ckpts = [f"dense{s}={work}/dense/seed{s}" for s in seeds if (work / "dense" / f"seed{s}").exists()]
    common = _common(plan, split)
    t0 = time.time()
    main = "eval-main.json" if split == "test" else f"eval-main-{split}.json"
    btm("eval", *common, "--domains", ",".join(doms), "--priors", str(work / "priors"),
        "--modes", "uniform,cached", "--topk", "1,2,8", "--clusters", str(work / "clusters"),
        "--cluster-temperature", str(temperature), *(["--checkpoint", *dense_ckpts] if dense_ckpts else []),
        "--output", str(out / main))
    for d in NOVEL:   # the posterior average is per target domain
        if (work / "avg" / d).exists():
            name = f"eval-avg-{d}.json" if split == "test" else f"eval-avg-{d}-{split}.json"
            btm("eval", *common, "--domains", d, "--no-single-experts", "--topk", "", "--modes", "uniform",
                "--checkpoint", f"posterior-avg={work}/avg/{d}", "--output", str(out / name))
    t["eval_s"] = time.time() - t0


def mean_row(table: dict, row: str, doms: list[str]) -> float:
    """The report's mean: the arithmetic mean of the domains' perplexities."""
    return sum(table["results"][d][row]["ppl"] for d in doms) / len(doms)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--steps", default="dense,priors,average,eval")
    ap.add_argument("--dense-seeds", default="0,1")
    ap.add_argument("--clusters", type=int, default=8, help="clusters evaluated besides the novel domains")
    ap.add_argument("--out-dir", type=Path, default=None, help="where eval JSON goes (default: --run-dir)")
    ap.add_argument("--split", default="test", help="eval: the split")
    ap.add_argument("--cluster-temperature", type=float, default=0.1, help="eval: T of the cluster rows")
    a = ap.parse_args(argv)
    work = a.run_dir.resolve()
    out = (a.out_dir or a.run_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(work)
    seeds = [int(s) for s in a.dense_seeds.split(",") if s]
    doms = eval_domains(plan, a.clusters)
    tf = out / "eval-timings.json"
    t = json.loads(tf.read_text()) if tf.exists() else {}
    for step in a.steps.split(","):
        {"dense": lambda: dense(work, plan, seeds, t), "priors": lambda: priors(work, plan, doms, t),
         "average": lambda: average(work, plan, t),
         "eval": lambda: evaluate(work, out, plan, doms, seeds, t, a.split, a.cluster_temperature)}[step]()
        tf.write_text(json.dumps(t, indent=1))
        print(step, "done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
