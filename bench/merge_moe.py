"""Benchmark: `btm merge-moe` of an 8-expert forest of a small GPT-2-style model.

Builds 8 synthetic experts (random values, Megatron key names and the TP=1 per-layer chunk
layout, bench/average.py's shapes) of a small model, registers them in a forest with the
project's own Forest API (Forest.create + add_expert, checksums and all), then runs the
`btm merge-moe --router random` command in a subprocess under /usr/bin/time (bench/average.py's
run_measured: page cache dropped where allowed, peak RSS of the child). Reported next to the
sizes: the largest tensor (the streaming bound) and one expert / the MoE output on disk.
Table on stdout; JSON + Markdown under bench/results/moe/.

    .venv/bin/python bench/merge_moe.py [--experts 8] [--work /tmp/btm-bench-merge-moe] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from average import megatron_shapes, run_measured, write_random_tp1  # noqa: E402

RESULTS = REPO / "bench" / "results" / "moe"
SMALL = dict(num_layers=6, hidden_size=512, num_attention_heads=8, seq_length=1024, vocab_size=8192)
TOKENIZER = "b" * 64


def write_expert(seed: int, ckpt_dir: Path) -> int:
    n = sum(t.numel() for t in write_random_tp1(ckpt_dir, megatron_shapes(SMALL), seed).values())
    model = dict(SMALL, tie_embeddings=True, make_vocab_size_divisible_by=128)
    (ckpt_dir / "meta.json").write_text(json.dumps({
        "format": "torch_dist", "weights_only": True, "parallel": {"tp": 1, "pp": 1},
        "model_config": model, "tokenizer_sha256": TOKENIZER}))
    return n


def make_forest(work: Path, experts: int) -> tuple[Path, int]:
    from megatron_btm.forest import Forest
    raw = work / "raw"
    n = write_expert(0, raw / "seed")
    meta = json.loads((raw / "seed" / "meta.json").read_text())
    forest = Forest.create(work / "forest", seed_checkpoint=raw / "seed",
                           seed_meta=dict(meta, tokenizer={"sha256": TOKENIZER}))
    for e in range(experts):
        write_expert(e + 1, raw / f"e{e}")
        forest.add_expert(f"e{e}", domain=f"d{e}", checkpoint_dir=raw / f"e{e}", parents=[("seed", 1.0)],
                          cycle=1, steps=1, tokens=1, config={"model": meta["model_config"]},
                          extra={"tokenizer_sha256": TOKENIZER}, move=True)
    shutil.rmtree(raw)
    return work / "forest", n


def size_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--work", default="/tmp/btm-bench-merge-moe")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    forest, params = make_forest(work, args.experts)
    shapes = megatron_shapes(SMALL)
    largest = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for n in sorted({2, args.experts}):  # the same forest, its first n experts
        out = work / f"moe{n}"
        cmd = [sys.executable, "-m", "megatron_btm.cli", "merge-moe", "--forest", str(forest),
               "--output", str(out), "--router", "random", "--topk", "2", "--no-progress",
               "--experts", ",".join(f"e{e}" for e in range(n))]
        r = run_measured(cmd, env=env, warm=[sys.executable, "-c", "import torch, megatron_btm.moe.merge"])
        summary = json.loads(r["output"][r["output"].index("{"):r["output"].rindex("}") + 1])
        rows.append(dict({k: r[k] for k in ("wall_s", "peak_rss_mib", "cpu_s", "caches_dropped", "loadavg_start")},
                         experts=n, in_process_wall_s=summary["wall_s"], moe_output_mib=size_mib(out)))
        shutil.rmtree(out)
    result = {
        "bench": "merge_moe", "experts": args.experts, "model": SMALL, "params_per_expert": params,
        "expert_mib": size_mib(forest / "experts" / "e0" / "checkpoint"),
        "largest_tensor": {"key": largest[0], "shape": list(largest[1]),
                           "mib": round(math.prod(largest[1]) * 4 / 2**20, 1)},
        "merge_moe": rows,
        "loadavg_end": [round(x, 1) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "note": "measured on a shared 2-core machine under load (other sessions' jobs running)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge_moe.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# bench/merge_moe.py", "",
        f"`btm merge-moe --router random` of the first n experts of one forest of {args.experts} experts × "
        f"{params / 1e6:.1f}M fp32 params ({SMALL['num_layers']} layers, hidden {SMALL['hidden_size']}, "
        f"vocab {SMALL['vocab_size']}); one expert {result['expert_mib']} MiB on disk; largest tensor "
        f"{largest[0]} {result['largest_tensor']['mib']} MiB. {result['note'].capitalize()}: load "
        f"average at the end {', '.join(map(str, result['loadavg_end']))}; page cache dropped before each "
        f"case: {rows[-1]['caches_dropped']}.", "",
        "| experts | wall s (whole process) | peak RSS MiB | CPU s | in-process s | MoE output MiB | load avg at start |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['experts']} | {r['wall_s']} | {r['peak_rss_mib']} | {r['cpu_s']} | {r['in_process_wall_s']} | "
          f"{r['moe_output_mib']} | {r['loadavg_start']} |" for r in rows], "",
        "Peak RSS is the whole process (Python, torch and Megatron's imports included). The merge "
        "streams one tensor at a time (a few times the largest tensor), so it does not grow with the "
        "number of experts. Wall times on this loaded machine are mostly waiting for the CPU (compare "
        "CPU s). `--router hidden` adds one forward pass of the merged model over each domain's sample "
        "(the whole MoE in memory) and one chunk-by-chunk copy of the output.",
    ]
    (RESULTS / "merge_moe.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
