"""Top-1 routing accuracy of router initialisations, per domain, layer and context position.

    python bench/moe_routing.py --acts ACTS.pt [--acts NAME=ACTS.pt ...] [--fit-blocks 16]

ACTS.pt: bench/moe_routing_collect.py's router inputs of a merged MoE under the uniform router
(the model `btm merge-moe` computes its rows with), on the valid split. Each variant's rows come
from the first --fit-blocks blocks of every domain (merge-moe's --num-sequences default) through
megatron_btm.moe.router_init.rows_from_stats, the code merge-moe runs; accuracy (the fraction
of a domain's tokens whose top-1 logit is its own expert) is measured on the remaining blocks
(held out, still valid). Layer 0's inputs do not depend on the router; layer l > 0's are the
uniform-router model's (bench/moe_report.py's route step measures the merged checkpoint as it
routes). A linear probe (softmax regression with bias, trained on the same fit tokens) is the
best a linear router of these inputs could be expected to do.

Writes bench/results/moe/routing.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megatron_btm.moe import router_init  # noqa: E402
from megatron_btm.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

OUT = REPO / "bench" / "results" / "moe"
POSITIONS = ((0, 1), (1, 8), (8, 32), (32, 128), (128, 100_000))


def stats_of(acts: dict, n_fit: int) -> dict:
    return {d: router_init.stats_of_tokens(v["x"][:, :n_fit]) for d, v in acts.items()}


def probe(acts: dict, domains: list[str], layer: int, n_fit: int, steps: int = 400):
    """Softmax regression (with bias) on the fit tokens: (rows [n, H], bias [n])."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([acts[d]["x"][layer, :n_fit] for d in domains])
    y = torch.cat([torch.full((n_fit,), i) for i, _ in enumerate(domains)])
    lin = torch.nn.Linear(x.shape[1], len(domains))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (4096,), generator=g)
        loss = torch.nn.functional.cross_entropy(lin(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lin.weight.detach().double(), lin.bias.detach().double()


def accuracy(acts, domains, rows, bias, layer, n_fit) -> dict:
    """{"own": [per domain], "by_position": {lo-hi: mean over domains}} on the held-out tokens."""
    own, bypos = [], {f"{lo}-{hi}": [] for lo, hi in POSITIONS}
    for e, d in enumerate(domains):
        x, pos = acts[d]["x"][layer, n_fit:].double(), acts[d]["pos"][n_fit:].long()
        logits = x @ rows.double().t() + (0 if bias is None else bias.double())
        hit = logits.argmax(-1) == e
        own.append(hit.double().mean().item())
        for lo, hi in POSITIONS:
            k = (pos >= lo) & (pos < hi)
            bypos[f"{lo}-{hi}"].append(hit[k].double().mean().item())
    return {"own": own, "by_position": {k: sum(v) / len(v) for k, v in bypos.items()}}


def measure(acts: dict, fit_blocks: int, seq: int) -> dict:
    domains = list(acts)
    n_fit = fit_blocks * seq
    stats = stats_of(acts, n_fit)
    layers = next(iter(acts.values()))["x"].shape[0]
    out = {}
    variants = {m: router_init.rows_from_stats(stats, domains, m) for m in router_init.METHODS}
    variants["lda (rows only, no bias)"] = (variants["lda"][0], None)
    for a in (1e-4, 0.1, 0.3):
        variants[f"lda shrinkage {a}"] = router_init.rows_from_stats(stats, domains, "lda", shrinkage=a)
    for name, (rows, bias) in variants.items():
        out[name] = [accuracy(acts, domains, rows[l], None if bias is None else bias[l], l, n_fit)
                     for l in range(layers)]
    out["linear probe (upper reference)"] = [
        accuracy(acts, domains, *probe(acts, domains, l, n_fit), l, n_fit) for l in range(layers)]
    return {"domains": domains, "fit_tokens_per_domain": n_fit,
            "held_out_tokens_per_domain": next(iter(acts.values()))["x"].shape[1] - n_fit,
            "variants": out}


def render(res: dict) -> str:
    lines = ["# Router initialisation: top-1 routing to the domain's own expert (valid split)", "",
             "bench/moe_routing.py: rows from the first fit blocks of each domain's valid split "
             "(merge-moe's default sample), accuracy on the held-out rest of valid, router inputs of "
             "the uniform-router merged model (layer > 0: approximate, see the script). Target of "
             "issue 16: >= 0.90 for every domain.", ""]
    for forest, r in res.items():
        doms = r["domains"]
        lines += [f"## {forest}", "", f"{r['fit_tokens_per_domain']:,} fit tokens and "
                  f"{r['held_out_tokens_per_domain']:,} held-out tokens per domain.", "",
                  "| variant | layer | min | mean | " + " | ".join(doms) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(doms)]
        for name, per_layer in r["variants"].items():
            for l, a in enumerate(per_layer):
                o = a["own"]
                lines.append(f"| {name} | {l} | {min(o):.3f} | {sum(o) / len(o):.3f} | "
                             + " | ".join(f"{x:.3f}" for x in o) + " |")
        pos = list(next(iter(r["variants"].values()))[0]["by_position"])
        lines += ["", "Mean over domains by position in the block (tokens of context):", "",
                  "| variant | layer | " + " | ".join(pos) + " |", "|---|---:|" + "---:|" * len(pos)]
        for name, per_layer in r["variants"].items():
            for l, a in enumerate(per_layer):
                lines.append(f"| {name} | {l} | " + " | ".join(f"{a['by_position'][k]:.3f}" for k in pos) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", action="append", required=True, help="[NAME=]ACTS.pt")
    p.add_argument("--fit-blocks", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=256)
    a = p.parse_args(argv)
    res = {}
    for spec in a.acts:
        name, _, path = spec.rpartition("=")
        res[name or Path(path).stem] = measure(torch.load(path), a.fit_blocks, a.seq_length)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "routing.json", {"fit_blocks": a.fit_blocks, "results": res})
    text = render(res)
    atomic_write_text(OUT / "routing.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
