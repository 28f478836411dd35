"""Training throughput and MFU of a GPT-2-124M-shaped model through the real `btm train-seed`.

Builds a synthetic corpus (one domain, words drawn from a fixed list), `btm preprocess`es it
with a small trained BPE, then runs `btm train-seed` with the GPT-2 small shape (12 layers,
hidden 768, 12 heads, sequence 1024, vocabulary 50257 — the tokenizer's ids are a subset, which
changes nothing in the cost) in the machine's default dtype (bf16 with CUDA). Reported: the
median tokens/s over the steps after the warm-up, and MFU = tokens/s × FLOPs per token / peak,
with Megatron-LM's count for a GPT with a 4h MLP (forward + backward, no recompute):

    FLOPs/token = 72·L·h² · (1 + s/(6h) + V/(12·h·L))      (V: the padded vocabulary)

and the H200's dense bf16 peak 989 TFLOP/s (`--peak-tflops`). Every step's log is the run's
train_log.jsonl; the summary goes to --out (JSON, and a Markdown table next to it).

    python bench/gpu_train.py                         # on a GPU machine
    python bench/gpu_train.py --cpu-dry-run           # tiny sizes, any machine (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPT2_SMALL = {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
              "seq_length": 1024, "vocab_size": 50257}
TINY = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "vocab_size": 512}
WORDS = ("the of and to in is was for on that with as by at from his her an which be this are "
         "had not have or one all their were they has been its who more also but into other "
         "first new time some two would these after when there may such only over years").split()


def flops_per_token(m: dict, padded_vocab: int) -> float:
    L, h, s = m["num_layers"], m["hidden_size"], m["seq_length"]
    return 72.0 * L * h * h * (1 + s / (6.0 * h) + padded_vocab / (12.0 * h * L))


def write_corpus(root: Path, docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    d = root / "synth"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", docs), ("valid", max(docs // 20, 4)), ("test", 4)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 400)))
                f.write(json.dumps({"text": text}) + "\n")


def btm(*args, log: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as f:
        f.write(f"$ btm {' '.join(map(str, args))}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)],
                              stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"btm {args[0]} failed (rc={proc.returncode}); see {log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny model and data, 3 steps")
    p.add_argument("--steps", type=int, help="training steps (default 40; dry run 3)")
    p.add_argument("--micro-batch", type=int, help="sequences per step (default 16; dry run 2)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the median")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200: 989)")
    p.add_argument("--work", default=None, help="work folder (default: bench/results/gpu_train-work)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_train.json"))
    a = p.parse_args()
    import torch

    from megatron_btm.megatron.model import GPTConfig
    from megatron_btm.utils.io import atomic_write_json, atomic_write_text
    shape = TINY if a.cpu_dry_run else GPT2_SMALL
    steps = a.steps or (3 if a.cpu_dry_run else 40)
    mbs = a.micro_batch or (2 if a.cpu_dry_run else 16)
    work = Path(a.work or REPO / "bench" / "results" / "gpu_train-work")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "btm.log"
    t0 = time.perf_counter()
    write_corpus(work / "corpus", docs=40 if a.cpu_dry_run else 400)
    if not (work / "data" / "tokenizer.json").exists():
        btm("preprocess", "--corpus-dir", work / "corpus", "--output-dir", work / "data",
            "--vocab-size", 300, "--workers", 1, "--no-progress", "--overwrite", log=log)
    run = work / "run"
    sets = [f"model.{k}={v}" for k, v in shape.items()] + [
        f"steps={steps}", f"micro_batch_size={mbs}", f"global_batch_size={mbs}",
        "log_interval=1", "eval_interval=0", "eval_iters=1", "save_interval=0",
        "tensorboard=false", "progress=false", "optim.warmup_steps=2", "optim.lr=0.0003",
        "optim.min_lr=0.00003"]
    if (run / "stage.json").exists():  # a finished run is re-read, not retrained
        print(f"{run}: finished already; reporting it")
    else:
        btm("train-seed", *[x for s in sets for x in ("--set", s)], "--data", work / "data",
            "--domains", "synth", "--output", run, "--resume", "none", log=log)
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    per_step = [r for r in records if "tokens_per_s" in r]
    steady = per_step[min(a.warmup_steps, len(per_step) - 1):]
    tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    run_meta = json.loads((run / "run.json").read_text())
    padded = GPTConfig(**shape).padded_vocab_size()
    fpt = flops_per_token(shape, padded)
    achieved = tok_s * fpt / 1e12
    summary = {
        "model": shape, "padded_vocab": padded, "params": GPTConfig(**shape).num_parameters(),
        "steps": steps, "micro_batch": mbs, "tokens_per_step": mbs * shape["seq_length"],
        "device_choices": run_meta["device_choices"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "median_over_steps": [steady[0]["step"], steady[-1]["step"]],
        "tokens_per_s": tok_s, "flops_per_token": fpt, "achieved_tflops": achieved,
        "peak_tflops": a.peak_tflops, "mfu": achieved / a.peak_tflops,
        "first_loss": per_step[0]["loss"], "last_loss": per_step[-1]["loss"],
        "wall_s": time.perf_counter() - t0, "dry_run": a.cpu_dry_run,
        "train_log": str(run / "train_log.jsonl")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, summary)
    c = summary["device_choices"]
    table = ("| model | device | dtype | tokens/s | TFLOP/s | MFU | loss first→last |\n"
             "|---|---|---|---:|---:|---:|---|\n"
             f"| {shape['num_layers']}L h{shape['hidden_size']} s{shape['seq_length']} "
             f"V{shape['vocab_size']} | {summary['gpu'] or c['device']} | {c['dtype']} | "
             f"{tok_s:,.0f} | {achieved:.1f} | {100 * summary['mfu']:.1f}% | "
             f"{summary['first_loss']:.3f}→{summary['last_loss']:.3f} |\n")
    atomic_write_text(os.path.splitext(a.out)[0] + ".md", table)
    print(table, end="")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
