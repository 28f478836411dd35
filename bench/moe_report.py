"""Issue 16's report: a forest merged into one MoE (`btm merge-moe`), before and after router
training, next to the ensemble, the posterior average and the compute-matched dense model.

Steps (each skipped when its output exists; `--steps` picks some):
  prior    `btm prior` on the valid split for every evaluated domain (cached prior)
  merge    `btm merge-moe --router hidden` (uniform shared weights), timed, peak RSS
  route    top-1 routing of each training domain's valid tokens to its own expert (per layer)
  train    `btm train-moe --mode router-only` and `--mode full` on the training mixture
  remove   `btm moe remove --expert legal` of the router-trained MoE (opt-out)
  eval     one `btm eval` on the test split: experts, ensembles, top-k, every MoE at top-1 and
           top-2, the dense seeds
  report   bench/results/moe/{report.md,results.json}: claims with the dense seed-noise verdict

--variants lda,...: other `--router` inits, each merged (moe-<v>), routed (the checkpoint as it
routes, held-out valid blocks 16..47, next to hidden on the same blocks), opted out of legal
before any training (moe-<v>-minus-legal) and evaluated in eval-variants.json; with
--variant-training router-only[,full] also trained as the hidden MoE is (train-<v>-router,
train-<v>-full). Their rows and claims are added next to the hidden router's.

Every choice (router steps, lr) is fixed here before any test number is seen; routing is
measured on valid. The posterior-weighted average of the same forest comes from the sweep's
results.json (the same forest and test blocks) when --sweep-results is given.

  python bench/moe_report.py --forest F --data D --dense s1=RUN,s2=RUN,s3=RUN --work W
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megatron_btm.experiment.claims import dense_noise, dense_table, gain, verdict  # noqa: E402
from megatron_btm.inference import rows as R  # noqa: E402
from megatron_btm.inference.tables import mean_ppl  # noqa: E402

OUT = REPO / "bench" / "results" / "moe"
TRAIN = ["bible", "novels", "legal", "dictionary", "biology", "code_c", "code_python", "changelogs"]
NOVEL = ["code_perl", "python_docs", "glossary", "debian_docs"]
REMOVED = "legal"
STEPS = ("prior", "merge", "route", "train", "remove", "eval", "report")


class Timings(dict):
    """Step timings, saved to the work folder after every step (a failed step keeps the rest)."""

    def __init__(self, path: Path):
        super().__init__(_load(path))
        self.path = path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.path.write_text(json.dumps(self, indent=1))


def btm(*args: str) -> dict:
    """Run one btm command in a fresh process: wall s and the child's peak RSS (MiB)."""
    t0 = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"btm {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(time.time() - t0, 2),
            "peak_rss_mib": round(peak / 1024, 1) if peak > before else None}


def _dense(spec: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in spec.split(",") if item)


def run_steps(a, t: dict) -> None:
    w, doms = a.work, TRAIN + NOVEL
    moe = {"hidden": w / "moe-hidden", "router": w / "train-router", "full": w / "train-full",
           "router-minus-legal": w / "moe-router-minus-legal"}
    if "prior" in a.steps and not (w / "priors").exists():
        t["prior"] = btm("prior", "--forest", a.forest, "--data", a.data, "--domains", ",".join(doms),
                         "--split", "valid", "--num-sequences", 16, "--no-progress", "--output", w / "priors")
    if "merge" in a.steps and not moe["hidden"].exists():
        t["merge"] = btm("merge-moe", "--forest", a.forest, "--output", moe["hidden"], "--router", "hidden",
                         "--data", a.data, "--split", "valid", "--topk", 2, "--no-progress")
    if "route" in a.steps and not (w / "routing.json").exists():
        from megatron_btm.inference.blocks import read_eval_blocks
        from megatron_btm.moe.router_init import routing_fractions
        meta = json.loads((moe["hidden"] / "meta.json").read_text())
        seq = meta["model_config"]["seq_length"]
        blocks = {d: read_eval_blocks(a.data, d, "valid", seq, max_blocks=16) for d in TRAIN}
        frac = routing_fractions(moe["hidden"], blocks, topk=1)
        experts = meta["moe_merge"]["domains"]
        own = {d: [layer[experts.index(d)] for layer in frac[d]] for d in TRAIN}
        (w / "routing.json").write_text(json.dumps({"experts": experts, "fractions": frac, "own": own}))
    common = ["--data", a.data, "--domains", ",".join(TRAIN), "--steps", a.router_steps, "--lr", a.lr,
              "--set", f"micro_batch_size={a.batch}", "--set", f"global_batch_size={a.batch}",
              "--set", "save_interval=0", "--no-progress"]
    for mode, key in (("router-only", "router"), ("full", "full")):
        if "train" in a.steps and not (moe[key] / "stage.json").exists():
            t[f"train_{key}"] = btm("train-moe", "--checkpoint", moe["hidden"], "--mode", mode,
                                    "--output", moe[key], *common)
    if "remove" in a.steps and not moe["router-minus-legal"].exists():
        t["remove"] = btm("moe", "remove", "--checkpoint", moe["router"], "--expert", REMOVED,
                          "--output", moe["router-minus-legal"])
    _run_variants(a, t, moe, common)
    if "eval" in a.steps and not (w / "eval.json").exists():
        dense = [f"dense-{k}={v}" for k, v in _dense(a.dense).items()]
        t["eval"] = btm("eval", "--forest", a.forest, "--data", a.data, "--domains", ",".join(doms),
                        "--split", "test", "--priors", w / "priors", "--topk", "1,2",
                        "--max-blocks", a.eval_blocks, "--checkpoint", ",".join(dense),
                        "--moe", ",".join(f"{k}={v}" for k, v in moe.items()), "--moe-topk", "1,2",
                        "--no-progress", "--output", w / "eval.json")


def _run_variants(a, t: dict, moe: dict, common: list) -> None:
    w = a.work
    for v in a.variants:
        out = w / f"moe-{v}"
        if "merge" in a.steps and not out.exists():
            t[f"merge_{v}"] = btm("merge-moe", "--forest", a.forest, "--output", out, "--router", v,
                                  "--data", a.data, "--split", "valid", "--topk", 2, "--no-progress")
        for mode in a.variant_training:   # the same training as the hidden router's, from this init
            key = f"{v}-{mode.split('-')[0]}"   # lda-router, lda-full
            if "train" in a.steps and not (w / f"train-{key}" / "stage.json").exists():
                t[f"train_{key}"] = btm("train-moe", "--checkpoint", out, "--mode", mode,
                                        "--output", w / f"train-{key}", *common)
        if "remove" in a.steps and not (w / f"moe-{v}-minus-{REMOVED}").exists():
            btm("moe", "remove", "--checkpoint", out, "--expert", REMOVED, "--output", w / f"moe-{v}-minus-{REMOVED}")
    if a.variants and "route" in a.steps and not (w / "routing-variants.json").exists():
        from megatron_btm.inference.blocks import read_eval_blocks
        from megatron_btm.moe.router_init import routing_fractions
        meta = json.loads((moe["hidden"] / "meta.json").read_text())
        seq, experts = meta["model_config"]["seq_length"], meta["moe_merge"]["domains"]
        blocks = {d: read_eval_blocks(a.data, d, "valid", seq, max_blocks=48)[16:] for d in TRAIN}
        own = {}
        for v in ["hidden", *a.variants]:
            frac = routing_fractions(moe["hidden"] if v == "hidden" else w / f"moe-{v}", blocks, topk=1)
            own[v] = {d: [layer[experts.index(d)] for layer in frac[d]] for d in TRAIN}
        (w / "routing-variants.json").write_text(json.dumps({"blocks": "valid 16..47", "own": own}))
    if a.variants and "eval" in a.steps and not (w / "eval-variants.json").exists():
        ckpts = [f"{v}={w / f'moe-{v}'}" for v in a.variants]
        ckpts += [f"{v}-minus-{REMOVED}={w / f'moe-{v}-minus-{REMOVED}'}" for v in a.variants]
        trained = [f"{v}-{m.split('-')[0]}" for v in a.variants for m in a.variant_training]
        ckpts += [f"{key}={w / ('train-' + key)}" for key in trained]
        t["eval_variants"] = btm("eval", "--forest", a.forest, "--data", a.data, "--domains", ",".join(TRAIN + NOVEL),
                                 "--split", "test", "--modes", "uniform", "--topk", "", "--no-single-experts",
                                 "--max-blocks", a.eval_blocks, "--moe", ",".join(ckpts), "--moe-topk", "1,2",
                                 "--no-progress", "--output", w / "eval-variants.json")


def removal_of(res: dict, parent: str, child: str) -> dict:
    """The opt-out's change of legal's and the other training domains' perplexity (top-1)."""
    others = [d for d in TRAIN if d != REMOVED]
    before = {k: mean_ppl(res, f"{parent}/top1", ds) for k, ds in (("legal", [REMOVED]), ("others", others))}
    after = {k: mean_ppl(res, f"{child}/top1", ds) for k, ds in (("legal", [REMOVED]), ("others", others))}
    return {"legal_before": before["legal"], "legal_after": after["legal"],
            "legal_change": after["legal"] / before["legal"] - 1, "others_before": before["others"],
            "others_after": after["others"], "others_change": after["others"] / before["others"] - 1}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def report(a) -> None:
    w = a.work
    ev, timings, route = _load(w / "eval.json"), _load(w / "timings.json"), _load(w / "routing.json")
    res = ev["results"]
    ev_v = _load(w / "eval-variants.json")
    variant_rows = [r for r in ev_v.get("rows", []) if r.startswith("moe/")]
    for d in res:
        res[d].update({r: ev_v["results"][d][r] for r in variant_rows})
    dense_rows = [r for r in ev["rows"] if r.startswith("model/dense-")]
    # the dense seeds as experiment/claims.py's units: its noise (max/min - 1) and reference
    dense_units = [{"test": {d: {R.DENSE: res[d][r]} for d in res}} for r in dense_rows]
    noise = dense_noise(dense_units, TRAIN)
    dense_mean = mean_ppl(dense_table(dense_units), R.DENSE, TRAIN)
    posterior = None
    if a.sweep_results:   # the posterior-weighted averages of the same forest, from its unit
        unit = json.loads(Path(a.sweep_results).read_text())["units"][a.sweep_unit]["test"]
        posterior = {"train": mean_ppl(unit, "model/posterior-average", TRAIN),
                     "novel": mean_ppl(unit, "model/posterior-average", NOVEL)}
    moe_rows = [r for r in ev["rows"] if r.startswith("moe/")]
    rows = ["ensemble/cached", "top1/doc", "top2/doc", *moe_rows, *variant_rows, *dense_rows]
    table = {r: {"train": mean_ppl(res, r, TRAIN), "novel": mean_ppl(res, r, NOVEL)} for r in rows}
    table["dense (seeds' mean NLL)"] = {"train": dense_mean,
                                        "novel": mean_ppl(dense_table(dense_units), R.DENSE, NOVEL)}
    if posterior:
        table[f"posterior average ({a.sweep_unit})"] = posterior

    def claim(g, what, numbers):
        return {"claim": what, "verdict": verdict(g, noise), "gain": g, "gain_over_noise": g / noise,
                "numbers": numbers}

    def beats(claimed_row, other, what):
        c = table[claimed_row]["train"]
        return claim(gain(c, other), what, f"{c:.2f} vs {other:.2f} ppl")

    claims = []
    for k in (1, 2):
        trained = [f"{v}-{m.split('-')[0]}" for v in a.variants for m in a.variant_training]
        for name in ("hidden", "router", "full", *a.variants, *trained):
            row = f"moe/{name}/top{k}"
            if row in table:
                claims.append(beats(row, dense_mean, f"MoE ({name}) top-{k} beats the compute-matched dense model on training domains"))
                claims.append(beats(row, table["ensemble/cached"]["train"], f"MoE ({name}) top-{k} beats the cached-prior ensemble on training domains"))
    for k in (1, 2):
        a_, b_ = f"moe/router/top{k}", f"moe/hidden/top{k}"
        if a_ in table and b_ in table:
            claims.append(beats(a_, table[b_]["train"], f"router-only training improves the merged MoE (top-{k})"))
        for v in a.variants:
            if f"moe/{v}/top{k}" in table and b_ in table:
                claims.append(beats(f"moe/{v}/top{k}", table[b_]["train"], f"the {v} router beats the hidden router before training (top-{k})"))
            for m, ref in (("router", "router"), ("full", "full")):
                if f"moe/{v}-{m}/top{k}" in table and f"moe/{ref}/top{k}" in table:
                    claims.append(beats(f"moe/{v}-{m}/top{k}", table[f"moe/{ref}/top{k}"]["train"],
                                        f"{m} training from the {v} init beats it from the hidden init (top-{k})"))
    # opt-out: removal of legal from the router-trained MoE (claims.py's removal rule)
    removals = {}
    for parent in ("router", *a.variants):
        child = f"moe/{parent}-minus-{REMOVED}"
        if f"{child}/top1" in table:
            r = removal_of(res, f"moe/{parent}", child)
            which = "router-trained MoE" if parent == "router" else f"{parent} router, no training"
            claims.append(claim(r["legal_change"] - r["others_change"], f"removing the {REMOVED} expert "
                                f"degrades {REMOVED} much more than the other domains ({which}, top-1)",
                                f"{REMOVED} ppl {r['legal_change']:+.1%}, others {r['others_change']:+.1%}"))
            removals[parent] = dict(r, verdict=claims[-1]["verdict"], which=which)
    removal = removals.get("router")
    cfg = json.loads((w / "moe-hidden" / "meta.json").read_text())["model_config"]
    out = {"invocation": "python " + " ".join(sys.argv), "forest": str(a.forest), "data": str(a.data), "dense": _dense(a.dense), "noise": noise,
           "router_steps": a.router_steps, "lr": a.lr, "batch": a.batch, "eval_blocks": a.eval_blocks,
           "table": table, "claims": claims, "removal": removal, "removals": removals, "routing": route,
           "variants": a.variants, "routing_variants": _load(w / "routing-variants.json"), "timings": timings,
           "posterior_average_from_sweep": posterior, "model_config": cfg,
           "environment": {"machine": platform.machine(), "cpus": os.cpu_count(),
                           "load_average": os.getloadavg(),
                           "flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                            if f.startswith(("avx", "fma", "sse4"))})}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(out, indent=1))
    (OUT / "report.md").write_text(render(out))
    print(render(out))


def render(o: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.2f}"   # noqa: E731
    lines = ["# MoE from the forest (issue 16): btm merge-moe, router training, opt-out", "",
             f"Forest: `{o['forest']}` (8 training experts); dense seeds: {', '.join(o['dense'])}. "
             f"Model per expert: {o['model_config']['num_layers']}x{o['model_config']['hidden_size']}. "
             f"Test split, {o['eval_blocks']} blocks per domain; token-weighted mean perplexity. "
             f"Dense seed noise (max/min − 1 of the seeds' mean ppl on the training domains, "
             f"experiment/claims.py's rule): {o['noise']:.2%}; the dense reference is the seeds' "
             "mean NLL per domain.", "",
             f"Router training: {o['router_steps']} steps at lr {o['lr']}, batch {o['batch']} sequences, "
             "on the balanced mixture of the 8 training domains; fixed before any test number. "
             f"Each training run sees {o['router_steps'] * o['batch'] * o['model_config']['seq_length']:,} tokens "
             "on top of the forest's budget: the trained MoE rows are not compute-matched to the dense "
             "model (they had more training tokens).", "",
             "Inference FLOPs per token: `moe/*/top1` runs the shared layers plus one expert MLP, as one dense "
             "model or `top1/doc` does; `top2` two MLPs; `ensemble/cached` runs all 8 models.", "",
             "| row | mean ppl (train) | mean ppl (novel) |", "|---|---:|---:|"]
    for r, v in o["table"].items():
        lines.append(f"| {r} | {f(v['train'])} | {f(v['novel'])} |")
    if o.get("posterior_average_from_sweep"):
        lines += ["", "The posterior average row: one `btm average --method posterior` model per "
                  "evaluated domain of the same forest, from the sweep's results.json (the same "
                  "test blocks)."]
    lines += ["", "## Claims", "", "| claim | verdict | gain | gain / noise | numbers |", "|---|---|---:|---:|---|"]
    for c in o["claims"]:
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {c['gain']:+.2%} | {c['gain_over_noise']:+.2f} | {c['numbers']} |")
    for r in o.get("removals", {}).values():
        lines += ["", f"## Opt-out: `btm moe remove --expert legal` ({r['which']}, top-1)", "",
                  f"legal: {r['legal_before']:.2f} -> {r['legal_after']:.2f} ppl ({r['legal_change']:+.1%}); "
                  f"other training domains: {r['others_before']:.2f} -> {r['others_after']:.2f} ({r['others_change']:+.2%}); "
                  f"verdict against the seed noise: **{r['verdict']}**."]
    if o.get("routing"):
        lines += ["", "## The hidden router before training (valid split, top-1 to the domain's own expert)", "",
                  "| domain | " + " | ".join(f"layer {i}" for i in range(len(next(iter(o['routing']['own'].values()))))) + " |",
                  "|---|" + "---:|" * len(next(iter(o['routing']['own'].values())))]
        for d, v in o["routing"]["own"].items():
            lines.append(f"| {d} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
        lo = min(min(v) for v in o["routing"]["own"].values())
        lines += ["", f"Lowest own-expert fraction: {lo:.3f} (issue target: >= 0.90 for every domain: "
                  f"{'met' if lo >= 0.9 else 'not met'})."]
    rv = o.get("routing_variants")
    if rv:
        lines += ["", f"## Router variants as merged and routed (top-1 to the own expert, {rv['blocks']}, "
                  "held out from the rows' sample; min over the layers)", "",
                  "| router | " + " | ".join(TRAIN) + " | lowest |", "|---|" + "---:|" * (len(TRAIN) + 1)]
        for v, own in rv["own"].items():
            lows = [min(own[d]) for d in TRAIN]
            lines.append(f"| {v} | " + " | ".join(f"{x:.3f}" for x in lows) + f" | {min(lows):.3f} |")
        lines += ["", "Per layer, per variant and by context position: bench/results/moe/routing.md "
                  "(bench/moe_routing.py). How much a perfect router could change: the forced "
                  "top-1 expert table, bench/results/moe/routing_oracle.md (bench/moe_routing_oracle.py)."]
    t = o["timings"]
    lines += ["", "## Time and memory (whole processes, a shared 2-core machine: wall times under load)", "",
              "| step | wall s | peak RSS MiB |", "|---|---:|---:|"]
    for k, v in t.items():
        lines.append(f"| {k} | {v['wall_s']} | {v.get('peak_rss_mib') or '-'} |")
    lines += ["", f"Invocation (report step; the run steps used the same arguments with "
              f"--steps prior,merge,route,train,remove,eval): `{o['invocation']}`"]
    lines += ["", f"CPU flags: {' '.join(o['environment']['flags'])}; load average at the end "
              f"{', '.join(f'{x:.1f}' for x in o['environment']['load_average'])}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forest", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--dense", required=True, help="NAME=RUN,... the compute-matched dense seeds")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--router-steps", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-blocks", type=int, default=24)
    p.add_argument("--sweep-results", default=None, help="the experiment's results.json")
    p.add_argument("--sweep-unit", default="btm-f0.50", help="the forest's unit in it")
    p.add_argument("--variants", default="", help="other --router inits to merge, route, opt out and evaluate")
    p.add_argument("--variant-training", default="", help="router-only,full: also train each variant so")
    a = p.parse_args(argv)
    a.steps = a.steps.split(",")
    a.variants = [v for v in a.variants.split(",") if v]
    a.variant_training = [m for m in a.variant_training.split(",") if m]
    a.work.mkdir(parents=True, exist_ok=True)
    run_steps(a, Timings(a.work / "timings.json"))
    if "report" in a.steps:
        report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
