"""How much the choice of expert matters in a merged MoE: perplexity of each domain with the
router forced to one expert for every token (top-1), for every expert.

    python bench/moe_routing_oracle.py --moe CKPT --data D [--split test] [--blocks 24]

The router rows are replaced in memory by zeros and the bias by +100 on expert e (the forced
top-1 of tests/moe/test_merge_moe.py), so the MoE is the averaged shared weights plus expert
e's MLP. The diagonal (each domain on its own expert) is the best a perfect domain router can
do at top-1; the gap to the other experts bounds what routing (and opting an expert out) can
change. Writes bench/results/moe/routing_oracle.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megatron_btm.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

OUT = REPO / "bench" / "results" / "moe"


def forced_ppl(moe: str, data: str, split: str, blocks: int) -> dict:
    from megatron_btm.inference.blocks import read_eval_blocks
    from megatron_btm.inference.scoring import IGNORE, load_expert, score_blocks
    from megatron_btm.moe.router_init import _routers
    meta = json.loads((Path(moe) / "meta.json").read_text())
    experts, seq = meta["moe_merge"]["domains"], meta["model_config"]["seq_length"]
    model = load_expert(moe, overrides={"moe_router_topk": 1})
    routers = _routers(model.model)
    if routers[0].bias is None:
        raise ValueError(f"{moe}: its router has no bias (this bench forces experts through it)")
    data_blocks = {d: read_eval_blocks(data, d, split, seq, max_blocks=blocks) for d in dict.fromkeys(experts)}
    ppl = {}
    for e, name in enumerate(experts):
        for r in routers:
            r.weight.data.zero_()
            r.bias.data.zero_()
            r.bias.data[e] = 100.0
        for d, b in data_blocks.items():
            ll = score_blocks(model, b)
            mask = b[:, 1:] != IGNORE
            ppl.setdefault(d, {})[name] = math.exp(-float(ll[mask].sum()) / int(mask.sum()))
    return {"experts": experts, "split": split, "blocks": blocks, "ppl": ppl}


def render(o: dict) -> str:
    ex = o["experts"]
    lines = ["# Forced top-1 expert: perplexity of each domain (rows) on each expert (columns)", "",
             f"bench/moe_routing_oracle.py on `{o['moe']}`, {o['split']} split, {o['blocks']} blocks per "
             "domain. own = the domain's expert; best other = the best of the other experts.", "",
             "| domain | " + " | ".join(ex) + " | own / best other - 1 | own / mean other - 1 |",
             "|---|" + "---:|" * (len(ex) + 2)]
    for d, row in o["ppl"].items():
        others = [v for k, v in row.items() if k != d]
        lines.append(f"| {d} | " + " | ".join(f"{row[k]:.1f}" for k in ex)
                     + f" | {row[d] / min(others) - 1:+.1%} | {row[d] / (sum(others) / len(others)) - 1:+.1%} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--blocks", type=int, default=24)
    a = p.parse_args(argv)
    out = dict(forced_ppl(a.moe, a.data, a.split, a.blocks), moe=a.moe)
    atomic_write_json(OUT / "routing_oracle.json", out)
    atomic_write_text(OUT / "routing_oracle.md", render(out))
    print(render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
