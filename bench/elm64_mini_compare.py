"""elm64-mini: clustered vs provenance domains at equal compute (c-BTM's claim), small.

From the elm64 run's seed checkpoint (192 steps on the mixture of all documents), two forests of
8 experts, each expert the same steps and tokens (--steps x global batch 4 x 64 tokens, the
run's training config), each branched from the seed:
  prov   the 8 provenance training corpora of the run's slice, as they are;
  clus   K = 8 clusters of the same training documents (`btm cluster fit --k 8`, `btm cluster
         assign`), the run's tokenizer for both (`btm preprocess --tokenizer`);
both trained by a one-cycle run plan through the in-process executor (`btm run`), then scored on
the same held-out documents: the 8 provenance test splits (`btm prior` on their valid splits,
`btm eval` with uniform / cached-prior ensembles, top-1/2 of the cached prior, the seed alone).

  python bench/elm64_mini_compare.py --run-dir /work/runs/elm64 --out /work/runs/elm64-extra/compare
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elm64_mini import TRAINING, btm, cluster_names  # noqa: E402
from elm64_mini_eval import _plan, mean_row  # noqa: E402

ROWS = ("ensemble/uniform", "ensemble/cached", "top1/doc", "top2/doc", "top1/token", "top2/token", "model/seed")


def data(work: Path, out: Path, t: dict) -> dict[str, Path]:
    sl, tok = work / "slice", work / "data" / "tokenizer.json"
    common = ["--corpus", str(sl), "--domains", ",".join(TRAINING), "--no-progress"]
    if not (out / "clusters8").exists():
        t["cluster_fit_s"] = btm("cluster", "fit", *common, "--k", "8", "--output", str(out / "clusters8"),
                                 "--sample-docs", "4000", "--seed", "0")
    if not (out / "corpus-clus").exists():
        t["cluster_assign_s"] = btm("cluster", "assign", *common, "--clusters", str(out / "clusters8"),
                                    "--output", str(out / "corpus-clus"))
    if not (out / "corpus-prov").exists():
        for d in TRAINING:
            shutil.copytree(sl / d, out / "corpus-prov" / d)
    dirs = {}
    for arm in ("prov", "clus"):
        dirs[arm] = out / f"data-{arm}"
        if not (dirs[arm] / "report.json").exists():
            t[f"preprocess_{arm}_s"] = btm("preprocess", "--corpus", str(out / f"corpus-{arm}"),
                                           "--output", str(dirs[arm]), "--tokenizer", str(tok),
                                           "--workers", "1", "--no-progress")
    return dirs


def arms(train_seeds: list[int]) -> list[tuple[str, str, int | None]]:
    """(arm, its domains' partition, training seed or None: the config's): prov, clus, prov-s<N>, ..."""
    out = []
    for seed in [None, *train_seeds]:
        out += [(f"{part}{'' if seed is None else f'-s{seed}'}", part, seed) for part in ("prov", "clus")]
    return out


def train(work: Path, out: Path, dirs: dict[str, Path], steps: int, seeds: list[int], t: dict) -> None:
    run_plan = _plan(work)
    seed = f"{run_plan['run_dir']}/seed"   # the seed's training run (finished: stage.json)
    for arm, part, tseed in arms(seeds):
        domains = list(TRAINING) if part == "prov" else cluster_names(8)
        plan = {"name": f"cmp-{arm}", "run_dir": str(out / arm), "data_dir": str(dirs[part]),
                "seed": {"checkpoint": seed}, "cycles": [{"domains": domains, "steps": steps}],
                "branch": {"policy": "seed"}, "executor": {"kind": "inprocess"}, "train": run_plan["train"],
                **({} if tseed is None else {"overrides": {"seed": tseed}})}
        f = out / f"{arm}.yaml"
        f.write_text(yaml.safe_dump(plan, sort_keys=False))
        if not (out / arm / "graph" / "done" / "cycle1-merge.json").exists():
            t[f"train_{arm}_s"] = btm("run", str(f), "--executor", "inprocess", timeout=7200)


def _domains(part: str) -> list[str]:
    return list(TRAINING) if part == "prov" else cluster_names(8)


def evaluate(work: Path, out: Path, dirs: dict[str, Path], blocks: int, seeds: list[int], t: dict) -> None:
    """Every forest on both partitions of the same test documents: by provenance and by cluster."""
    seed = f"{_plan(work)['run_dir']}/seed"
    for arm, _, _ in arms(seeds):
        for on in ("prov", "clus"):
            sfx = "" if on == "prov" else "-on-clus"
            forest, pri = str(out / arm / "forest"), out / f"priors-{arm}{sfx}"
            res = out / f"eval-{arm}{sfx}-b{blocks}.json"
            doms = ",".join(_domains(on))
            if not all((pri / f"{d}.json").is_file() for d in _domains(on)):  # none or part
                t[f"priors_{arm}{sfx}_s"] = btm("prior", "--forest", forest, "--data", str(dirs[on]), "--domains",
                                                doms, "--split", "valid", "--num-sequences", "8",
                                                "--no-progress", "--output", str(pri))
            if not res.exists():
                t[f"eval_{arm}{sfx}_b{blocks}_s"] = btm("eval", "--forest", forest, "--data", str(dirs[on]), "--domains",
                                              doms, "--split", "test", "--max-blocks", str(blocks),
                                              "--priors", str(pri), "--modes", "uniform,cached", "--topk", "1,2",
                                              "--checkpoint", f"seed={seed}", "--no-progress",
                                              "--output", str(res))


def summarize(out: Path, steps: int, blocks: int, seeds: list[int], t: dict) -> dict:
    res = {"steps_per_expert": steps, "tokens_per_expert": steps * 4 * 64, "experts": 8, "train_seeds": seeds,
           "eval": f"the same test documents partitioned two ways, the 8 provenance test splits (mean_ppl) "
                   f"and the 8 clusters' test splits (mean_ppl_on_clusters), {blocks} blocks of 64 tokens "
                   "per split; cached prior from 8 valid sequences of each", "timings_s": t,
           "mean_ppl": {}, "mean_ppl_on_clusters": {}, "per_domain": {}}
    for arm, _, _ in arms(seeds):
        for key, sfx, on in (("mean_ppl", "", "prov"), ("mean_ppl_on_clusters", "-on-clus", "clus")):
            f = out / f"eval-{arm}{sfx}-b{blocks}.json"
            if not f.exists():
                continue
            tab = json.loads(f.read_text())
            res[key][arm] = {r: mean_row(tab, r, _domains(on)) for r in ROWS if r in tab["rows"]}
            if on == "prov":
                res["per_domain"][arm] = {d: {r: tab["results"][d][r]["ppl"] for r in ROWS
                                              if r in tab["results"][d]} for d in TRAINING}
    rep = json.loads((out / "corpus-clus" / "report.json").read_text())
    res["clusters"] = {"k": 8, "purity": rep.get("purity"), "purity_bytes": rep.get("purity_bytes"),
                       "documents": rep.get("sizes"), "bytes": rep.get("bytes")}
    return res


def table(res: dict) -> str:
    """Markdown: rows x (arm on provenance splits, arm on cluster splits)."""
    arms = list(res["mean_ppl"])
    head = [f"{arm} / {on}" for on in ("prov splits", "cluster splits") for arm in arms]
    lines = ["| row | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for r in ROWS:
        cells = [res[key].get(arm, {}).get(r) for key in ("mean_ppl", "mean_ppl_on_clusters") for arm in arms]
        lines.append(f"| {r} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=32, help="steps per expert (both forests)")
    ap.add_argument("--max-blocks", type=int, default=16, help="test blocks per domain")
    ap.add_argument("--train-seeds", default="", help="more forests of both arms with these data-order "
                    "seeds (the noise between forests)")
    ap.add_argument("--stages", default="data,train,eval", help="data, train, eval, summary (the JSON only)")
    a = ap.parse_args(argv)
    work, out = a.run_dir.resolve(), a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tf = out / "timings.json"
    t = json.loads(tf.read_text()) if tf.exists() else {}
    stages = a.stages.split(",")
    seeds = [int(x) for x in a.train_seeds.split(",") if x]
    dirs = data(work, out, t) if "data" in stages else {arm: out / f"data-{arm}" for arm in ("prov", "clus")}
    tf.write_text(json.dumps(t, indent=1))
    if "train" in stages:
        train(work, out, dirs, a.steps, seeds, t)
        tf.write_text(json.dumps(t, indent=1))
    if "eval" in stages:
        evaluate(work, out, dirs, a.max_blocks, seeds, t)
        tf.write_text(json.dumps(t, indent=1))
    if "eval" in stages or "summary" in stages:
        res = summarize(out, a.steps, a.max_blocks, seeds, t)
        (out / f"compare-b{a.max_blocks}.json").write_text(json.dumps(res, indent=1))
        (out.parent / "compare.json").write_text(json.dumps(res, indent=1))
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
