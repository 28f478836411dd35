"""elm64-mini: the cluster router's temperature T swept on the valid split, chosen there, and the
chosen T's test rows next to the cached prior.

`btm eval --clusters DIR --cluster-temperature T` scores all 64 experts for every T; the experts'
log-likelihoods do not depend on T, so this scores each split once (btm eval's own functions:
inference.scoring.score_checkpoints, ensemble.evaluate_rows, inference.cluster_rows) and
recomputes only the cluster weights per T. Checks against btm eval: the test rows at T = 0.1
must reproduce eval-main.json (the run's `btm eval`), and --check-valid FILE (a `btm eval
--split valid --cluster-temperature T` table) the valid rows at its T.

  python bench/elm64_mini_tsweep.py --run-dir /work/runs/elm64 --out /work/runs/elm64-extra/tsweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elm64_mini import NOVEL  # noqa: E402
from elm64_mini_eval import _plan, eval_domains, mean_row  # noqa: E402

ROWS = ("ensemble/uniform", "ensemble/cached", "ensemble/cluster", "top1/cluster", "top2/cluster",
        "top8/cluster", "top1/doc", "top2/doc", "top8/doc", "top1/token", "top2/token", "top8/token")


def tables(work: Path, plan: dict, doms: list[str], split: str, temps: list[float], priors: bool) -> dict:
    """{T: {"results": {domain: {row: cell}}}} of one split, the experts scored once."""
    import torch
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.inference import ensemble
    from megatron_btm.inference.cluster_rows import cluster_rows
    from megatron_btm.inference.eval_cli import load_priors
    from megatron_btm.inference.forest_eval import _common_shape, _read_blocks, forest_checkpoints
    from megatron_btm.inference.scoring import IGNORE, score_checkpoints
    from megatron_btm.routing.cluster import ClusterRouter
    torch.set_num_threads(1)
    ckpts = forest_checkpoints(f"{plan['run_dir']}/forest")
    ids = [n for n, _ in ckpts]
    seq, vocab = _common_shape(ckpts)
    blocks = _read_blocks(plan["data_dir"], doms, split, seq, vocab, plan["evaluation"]["max_blocks"], "stream")
    ll = score_checkpoints(ckpts, blocks, batch_size=8)
    pri = load_priors(str(work / "priors"), doms, ids) if priors else {}
    tok = load_tokenizer(Path(plan["data_dir"]) / "tokenizer.json")
    base = ClusterRouter.load(work / "clusters").for_experts(ids)
    out = {}
    for temp in temps:
        router = ClusterRouter(base.model, temp)
        res = {}
        for d in doms:
            valid = blocks[d][:, 1:] != IGNORE
            p = pri.get(d)
            rows = ensemble.evaluate_rows(ll[d], valid, ids, single_experts=False, topk=(1, 2, 8),
                                          modes=("uniform", "cached") if p is not None else ("uniform",),
                                          prior_K=None if p is None else torch.as_tensor(p, dtype=torch.float64))
            rows.update(cluster_rows(ll[d], valid, blocks[d], router, tok, (1, 2, 8))[0])
            res[d] = rows
        out[f"{temp:g}"] = {"results": res}
    return out


def summary(tab: dict, doms: list[str]) -> dict:
    novel, clus = [d for d in doms if d in NOVEL], [d for d in doms if d not in NOVEL]
    rows = [r for r in ROWS if r in next(iter(tab["results"].values()))]
    return {r: {"novel": mean_row(tab, r, novel), "clusters": mean_row(tab, r, clus)} for r in rows}


def max_diff(a: dict, b: dict, rows) -> float:
    return max(abs(a["results"][d][r]["nll"] - b["results"][d][r]["nll"]) for d in a["results"] for r in rows
               if r in b["results"][d])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--temperatures", default="0.01,0.03,0.1,0.3,1,3,10")
    ap.add_argument("--clusters", type=int, default=8, help="clusters evaluated besides the novel domains")
    ap.add_argument("--check-valid", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.run_dir.resolve()
    plan = _plan(work)
    doms = eval_domains(plan, a.clusters)
    temps = [float(x) for x in a.temperatures.split(",")]
    t0 = time.time()
    valid = tables(work, plan, doms, "valid", temps, priors=False)
    t_valid = time.time() - t0
    crit = {t: mean_row(tab, "ensemble/cluster", doms) for t, tab in valid.items()}
    best = min(crit, key=crit.get)
    t0 = time.time()
    test = tables(work, plan, doms, "test", sorted({float(best), 0.1}), priors=True)
    out = {"split_chosen_on": "valid", "criterion": "mean ppl of ensemble/cluster over the "
           f"{len(doms)} evaluated domains (valid)", "domains": doms, "chosen_T": float(best),
           "valid_criterion": crit, "valid": {t: summary(tab, doms) for t, tab in valid.items()},
           "test": {t: summary(tab, doms) for t, tab in test.items()},
           "seconds": {"valid": t_valid, "test": time.time() - t0}, "checks": {}}
    main_eval = json.loads((work / "eval-main.json").read_text())
    out["checks"]["test_T0.1_vs_eval_main_max_nll_diff"] = max_diff(test["0.1"], main_eval, ROWS)
    if a.check_valid and a.check_valid.exists():
        ref = json.loads(a.check_valid.read_text())
        t = f"{ref['cluster']['temperature']:g}"
        if t in valid:
            out["checks"][f"valid_T{t}_vs_btm_eval_max_nll_diff"] = max_diff(valid[t], ref, ROWS)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("chosen_T", "valid_criterion", "test", "checks")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
