"""Router inputs of a merged MoE under the uniform router, per domain, token and layer.

    python bench/moe_routing_collect.py --moe CKPT --data D --domains a,b --output acts.pt
                                        [--split valid] [--start 0] [--blocks 128]

Loads the MoE checkpoint with a zero router over top-n (the model `--router hidden` runs to
compute its rows: the uniform mixture of the experts), forwards blocks [start, start+blocks)
of each domain's split and saves {domain: {"x": [L, N, H] float32, "pos": [N] int16}} (the
valid tokens only, position in the block). bench/moe_routing.py scores router variants on it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def collect(moe: str, data: str, domains: list[str], *, split: str, start: int, blocks: int,
            batch_size: int = 8) -> dict:
    from megatron_btm.inference.blocks import read_eval_blocks
    from megatron_btm.inference.scoring import load_expert
    from megatron_btm.moe.router_init import _routers, _run
    import json
    cfg = json.loads((Path(moe) / "meta.json").read_text())["model_config"]
    n, seq = cfg["num_moe_experts"], cfg["seq_length"]
    expert = load_expert(moe, overrides={"moe_router_topk": n})
    for r in _routers(expert.model):   # the uniform router, as merge-moe's scratch model
        r.weight.data.zero_()
        if r.bias is not None:
            r.bias.data.zero_()
    data_blocks = {d: read_eval_blocks(data, d, split, seq, max_blocks=start + blocks)[start:]
                   for d in domains}
    xs = {d: [[] for _ in range(cfg["num_layers"])] for d in domains}
    pos = {d: [] for d in domains}

    def hook(layer, router, x, mask, domain):
        xs[domain][layer].append(x[mask].float().cpu())
        if layer == 0:
            b = mask.numel() // seq   # [S*B] in [S, B] order
            pos[domain].append((torch.arange(mask.numel()) // b)[mask.cpu()].to(torch.int16))

    _run(expert, data_blocks, batch_size, hook, False, "collect")
    return {d: {"x": torch.stack([torch.cat(v) for v in xs[d]]), "pos": torch.cat(pos[d])}
            for d in domains}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--domains", required=True)
    p.add_argument("--split", default="valid")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--blocks", type=int, default=128)
    p.add_argument("--output", type=Path, required=True)
    a = p.parse_args(argv)
    out = collect(a.moe, a.data, a.domains.split(","), split=a.split, start=a.start, blocks=a.blocks)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, a.output)
    for d, v in out.items():
        print(d, tuple(v["x"].shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
