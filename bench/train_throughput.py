"""Training throughput: our Megatron-Core expert step vs a plain-PyTorch GPT of the same shape.

Both run in this one process on the same batches, fp32, the same thread count; rounds alternate
(Megatron then torch, then torch then Megatron, ...) after a warm-up, so a load change on a
shared machine hits both paths alike. Reported: the median tokens/s of each and the ratio.

(a) Megatron: the real trainer's step (`training.loop._setup`: GPTModel from `build_model` +
    Megatron DDP + Megatron optimizer + LR scheduler; `_run_schedule`: get_forward_backward_func),
    exactly what `train()` runs per step (zero grad buffers, schedule, optimizer.step, scheduler).
(b) Plain torch: nn.Embedding + learned positions, pre-LN blocks with
    F.scaled_dot_product_attention(is_causal=True), exact GeLU MLP, biases, final LN, tied head,
    torch.optim.AdamW, clip_grad_norm_.

    python bench/train_throughput.py                 # both shapes, writes bench/results/
    python bench/train_throughput.py --shapes tiny --rounds 3 --profile
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # the paper's smallest ("tiny") config as run on this CPU, and one twice as wide
    "tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256, vocab_size=8192),
    "wide": dict(num_layers=4, hidden_size=512, num_attention_heads=8, seq_length=256, vocab_size=8192),
}
MICRO_BATCH = 8
OPTIM = dict(lr=3e-4, min_lr=3e-4, warmup_steps=0, decay_style="constant", weight_decay=0.01,
             adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0)


class Block(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h, eps=1e-5), nn.LayerNorm(h, eps=1e-5)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x_BSH):
        b, s, h = x_BSH.shape
        q, k, v = self.qkv(self.ln1(x_BSH)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)  # [b, heads, s, d]
        x_BSH = x_BSH + self.proj(att.transpose(1, 2).reshape(b, s, h))
        return x_BSH + self.fc2(F.gelu(self.fc1(self.ln2(x_BSH))))


class PlainGPT(nn.Module):
    def __init__(self, *, num_layers, hidden_size, num_attention_heads, seq_length, vocab_size):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, hidden_size), nn.Embedding(seq_length, hidden_size)
        self.blocks = nn.ModuleList(Block(hidden_size, num_attention_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden_size, eps=1e-5)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens_BS, labels_BS):
        x = self.wte(tokens_BS) + self.wpe(torch.arange(tokens_BS.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits_BSV = self.ln_f(x) @ self.wte.weight.T  # tied head
        return F.cross_entropy(logits_BSV.flatten(0, 1), labels_BS.flatten())


def make_batches(n: int, shape: dict, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, shape["vocab_size"], (MICRO_BATCH, shape["seq_length"] + 1), generator=g)
        out.append({"tokens": x[:, :-1], "labels": x[:, 1:],
                    "loss_mask": torch.ones(MICRO_BATCH, shape["seq_length"]),
                    "position_ids": torch.arange(shape["seq_length"]).expand(MICRO_BATCH, -1)})
    return out


def megatron_stepper(shape: dict):
    """One training step of the real trainer (training/loop.py `train`'s loop body)."""
    from megatron_btm.training import loop
    from megatron_btm.training.config import TrainConfig
    cfg = TrainConfig.from_dict({"model": shape, "micro_batch_size": MICRO_BATCH,
                                 "global_batch_size": MICRO_BATCH, "steps": 10 ** 6,
                                 "optim": OPTIM, "progress": False, "tensorboard": False})
    chunks, optimizer, scheduler, _ = loop._setup(cfg)
    num_params = sum(p.numel() for m in chunks for p in m.parameters())

    def step(batch, phases):
        t0 = time.perf_counter()
        for m in chunks:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        loss = float(loop._run_schedule(chunks, [batch], cfg, forward_only=False))
        t1 = time.perf_counter()
        optimizer.step()
        scheduler.step(increment=1)
        phases["fwd_bwd"].append(t1 - t0)
        phases["optim"].append(time.perf_counter() - t1)
        return loss
    return step, num_params


def torch_stepper(shape: dict):
    torch.manual_seed(0)
    model = PlainGPT(**shape)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # as Megatron: no wd on biases/LN
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=OPTIM["lr"],
                            betas=(OPTIM["adam_beta1"], OPTIM["adam_beta2"]), eps=OPTIM["adam_eps"])

    def step(batch, phases):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(batch["tokens"], batch["labels"])
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_grad"])
        opt.step()
        phases["fwd_bwd"].append(t1 - t0)
        phases["optim"].append(time.perf_counter() - t1)
        return loss.item()
    return step, sum(p.numel() for p in model.parameters())


def timed(step, batch, phases) -> tuple[float, float, float]:
    """(wall s, process CPU s, loss). CPU time (all threads) is the load-robust second view: on a
    shared, oversubscribed machine wall time also counts the waits for a core."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step(batch, phases)
    return time.perf_counter() - t0, time.process_time() - c0, loss


def profile_step(step, batches, top: int = 12) -> dict[str, str]:
    """Where one path's time goes: torch.profiler ops (self CPU) and cProfile (Python callers)."""
    from torch.profiler import ProfilerActivity, profile
    scratch = {"fwd_bwd": [], "optim": []}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            step(b, scratch)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    pr = cProfile.Profile()
    pr.enable()
    for b in batches:
        step(b, scratch)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
    return {"torch_ops": ops, "cprofile": s.getvalue()}


def bench_shape(name: str, shape: dict, *, warmup: int, rounds: int, steps_per_round: int,
                profile: bool) -> dict:
    tokens_per_step = MICRO_BATCH * shape["seq_length"]
    paths = {"megatron": megatron_stepper(shape), "torch": torch_stepper(shape)}
    batches = make_batches(warmup + rounds * steps_per_round, shape)
    times: dict[str, list[float]] = {p: [] for p in paths}
    cpu_times: dict[str, list[float]] = {p: [] for p in paths}
    phases = {p: {"fwd_bwd": [], "optim": []} for p in paths}
    warm = {"fwd_bwd": [], "optim": []}
    losses: dict[str, list[float]] = {p: [] for p in paths}
    for p, (step, _) in paths.items():
        for b in batches[:warmup]:
            losses[p].append(timed(step, b, warm)[2])
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        chunk = batches[warmup + r * steps_per_round: warmup + (r + 1) * steps_per_round]
        for p in order:
            for b in chunk:
                dt, cpu, loss = timed(paths[p][0], b, phases[p])
                times[p].append(dt)
                cpu_times[p].append(cpu)
                losses[p].append(loss)
        print(f"  {name} round {r + 1}/{rounds}: " + ", ".join(
            f"{p} {tokens_per_step / statistics.median(times[p][-steps_per_round:]):.0f} tok/s"
            for p in order), flush=True)
    out = {"shape": shape, "micro_batch": MICRO_BATCH, "tokens_per_step": tokens_per_step,
           "num_params": {p: paths[p][1] for p in paths}}
    for p in paths:
        med = statistics.median(times[p])
        cpu = statistics.median(cpu_times[p])
        out[p] = {"median_step_s": med, "tokens_per_s": tokens_per_step / med,
                  "median_cpu_s": cpu, "best_tokens_per_s": tokens_per_step / min(times[p]), "tokens_per_cpu_s": tokens_per_step / cpu,
                  "step_s": times[p], "cpu_s": cpu_times[p],
                  "median_phase_s": {k: statistics.median(v) for k, v in phases[p].items()},
                  "first_loss": losses[p][0], "last_loss": losses[p][-1]}
    out["ratio_megatron_over_torch"] = out["megatron"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    out["ratio_cpu_time"] = out["megatron"]["tokens_per_cpu_s"] / out["torch"]["tokens_per_cpu_s"]
    # per-round (adjacent in time) ratios: a load swing between rounds cancels within a pair
    k = steps_per_round
    per_round = [statistics.median(times["torch"][i:i + k]) / statistics.median(times["megatron"][i:i + k])
                 for i in range(0, len(times["torch"]), k)]
    out["ratio_per_round"] = per_round
    # fastest step of each path: the least-contended measurement on a shared machine (timeit's min)
    out["ratio_best_step"] = min(times["torch"]) / min(times["megatron"])
    out["ratio_paired_median"] = statistics.median(per_round)
    if profile or out["ratio_megatron_over_torch"] < 0.9:
        extra = batches[:2]
        out["profile"] = {p: profile_step(paths[p][0], extra) for p in paths}
    return out


def _phase(r: dict, name: str) -> str:
    return " / ".join(f"{r[p]['median_phase_s'][name]:.3f}" for p in ("megatron", "torch"))


def render(results: dict) -> str:
    lines = [f"load average at start {results['loadavg_start']}, end {results['loadavg_end']} "
             f"({os.cpu_count()} CPUs visible, {results['threads']} torch threads)", "",
             "ratio = Megatron tok/s ÷ torch tok/s (medians of wall time); paired = median over "
             "rounds of the ratio within a round (adjacent steps); best = fastest step of each "
             "(least contended); CPU time = process CPU s/step", "",
             "| shape | params | tokens/step | Megatron tok/s | torch tok/s | ratio (wall) "
             "| paired ratio | best tok/s (M / T) | ratio (best) | ratio (CPU time) "
             "| fwd+bwd s (M / T) | optimizer s (M / T) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["shapes"].items():
        s = r["shape"]
        lines.append(f"| {name} (L{s['num_layers']} h{s['hidden_size']} a{s['num_attention_heads']} "
                     f"s{s['seq_length']} V{s['vocab_size']}) | {r['num_params']['megatron'] / 1e6:.2f}M | "
                     f"{r['tokens_per_step']} | {r['megatron']['tokens_per_s']:.0f} | "
                     f"{r['torch']['tokens_per_s']:.0f} | {r['ratio_megatron_over_torch']:.3f} | "
                     f"{r['ratio_paired_median']:.3f} | {r['megatron']['best_tokens_per_s']:.0f} / "
                     f"{r['torch']['best_tokens_per_s']:.0f} | {r['ratio_best_step']:.3f} | "
                     f"{r['ratio_cpu_time']:.3f} | {_phase(r, 'fwd_bwd')} | {_phase(r, 'optim')} |")
    for name, r in results["shapes"].items():
        rr = r["ratio_per_round"]
        la = r.get("loadavg", {})
        lines.append(f"\n{name}: per-round ratios {min(rr):.2f}..{max(rr):.2f}; 1-min load "
                     f"{la.get('start', ['?'])[0]:.1f} → {la.get('end', ['?'])[0]:.1f} during this "
                     f"shape; losses Megatron {r['megatron']['first_loss']:.3f}→"
                     f"{r['megatron']['last_loss']:.3f}, torch {r['torch']['first_loss']:.3f}→"
                     f"{r['torch']['last_loss']:.3f} (random tokens: ≈ ln V = 9.01 is the floor)")
    return "\n".join(lines)


NOTE = """
Where the time goes (torch.profiler / cProfile, 2026-11-28): both paths run the same torch
AdamW; Megatron's own optimizer additions (grad norm, clip, param.grad = main_grad) cost
< 5 ms/step. Megatron's forward+backward does a little more work per step: vocab-parallel
cross-entropy in separate passes over the [s, b, V] fp32 logits (max, sub, exp, sum, div) where
torch uses one fused log_softmax; DDP main_grad accumulation over the grad buffer; biases added
apart from the matmul; the fused-QKV split's backward; SDPA on permuted q/k/v. On a loaded
machine (1-min load 3-60 on 2 cores) single steps vary up to ~5x: compare the load columns
before reading a ratio.
"""


def write_outputs(results: dict, out: Path) -> None:
    from megatron_btm.utils.io import atomic_write_json, atomic_write_text
    table = render(results)
    print(table)
    atomic_write_json(out, results)
    prof = "".join(f"\n### {n}: {p}\n\n```\n{d['torch_ops']}\n```\n"
                   for n, r in results["shapes"].items() for p, d in r.get("profile", {}).items())
    atomic_write_text(out.with_suffix(".md"), "# Training throughput (CPU)\n\n" + table + "\n"
                      + NOTE + prof)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,wide", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per path")
    ap.add_argument("--rounds", type=int, default=12, help="alternating timed rounds")
    ap.add_argument("--steps-per-round", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="profile both paths even if ratio >= 0.9")
    ap.add_argument("--wait-load", type=float, default=None,
                    help="before each shape, wait (up to --wait-max s) until the 1-min load "
                         "average is below this (other jobs share the machine)")
    ap.add_argument("--wait-max", type=float, default=900)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    ap.add_argument("--render", metavar="JSON", help="only re-render JSON's table and .md")
    args = ap.parse_args(argv)
    if args.render:
        write_outputs(json.loads(Path(args.render).read_text()), Path(args.render))
        return 0
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; valid: {sorted(SHAPES)}")
    torch.set_num_threads(args.threads)
    from megatron_btm.megatron import parallel
    parallel.init_distributed()
    parallel.setup_model_parallel(parallel.ParallelConfig(tp=1, pp=1))
    results = {"loadavg_start": [round(x, 2) for x in os.getloadavg()], "threads": args.threads,
               "torch": torch.__version__, "started": datetime.datetime.now(datetime.timezone.utc)
               .isoformat(timespec="seconds"), "shapes": {}, "argv": sys.argv[1:]}
    import megatron.core
    results["megatron_core"] = megatron.core.__version__
    for name in args.shapes.split(","):
        if args.wait_load is not None:
            deadline = time.monotonic() + args.wait_max
            while os.getloadavg()[0] > args.wait_load and time.monotonic() < deadline:
                time.sleep(5)
        print(f"{name}: {SHAPES[name]} (load {os.getloadavg()[0]:.2f})", flush=True)
        load0 = os.getloadavg()
        results["shapes"][name] = bench_shape(name, SHAPES[name], warmup=args.warmup,
                                              rounds=args.rounds, steps_per_round=args.steps_per_round,
                                              profile=args.profile)
        results["shapes"][name]["loadavg"] = {"start": list(load0), "end": list(os.getloadavg())}
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_outputs(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
