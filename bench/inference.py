"""Serving benchmark: cost per token as the forest grows (route first, KV cache, experts on demand).

One small GPT ("bench model": 2 layers, hidden 256, seq_length 320, a ~500-id BPE) is saved,
then copied with small per-expert perturbations into forests of n = 4, 16 and 64 experts (no
training: cost, not quality, is measured). Measured, in this order:
  eval ms/token     `serving.routed.evaluate_routed`, route = top-k of a cached prior, k = 1, 2, n
  gen  ms/token     `serving.routed.generate_routed`, same routes, greedy, one prompt, warm pool
                    (the k experts already loaded: steady-state decoding)
  gen prefix:16     top-2 of the posterior over the prompt's first 16 ids (all n experts score them)
  single model      inference.generate on one expert, KV cache and no cache, 256 new tokens
  HF generate       the same model exported (`btm export-hf`), transformers' generate, greedy,
                    use_cache=True, 256 new tokens
  peak RSS          a fresh subprocess: prefix routing over n = 64 (every expert loaded in turn),
                    top-2 generation; (ru_maxrss − its value before the first expert) / bytes of
                    one model's weights

Timings are the fastest of --repeats runs (the least-contended: the machine is shared with other
sessions); evaluation rows are one run each.

    python bench/inference.py [--threads 1] [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PROMPT_LEN, NEW_TOKENS, LONG_NEW = 16, 64, 256


def cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
                                if f in flags)
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _status_mb(key: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_now_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup(work: Path, threads: int):
    import torch

    from megatron_btm.megatron.parallel import ParallelConfig, init_distributed, setup_model_parallel
    torch.set_num_threads(threads)
    init_distributed(init_method=f"file://{work}/pg", rank=0, world_size=1)
    setup_model_parallel(ParallelConfig(tp=1))


def make_world(work: Path, sizes: list[int]) -> dict:
    """Tokenizer, base checkpoint and the largest forest (smaller forests are its prefixes)."""
    import torch

    from megatron_btm.data.tokenizer import train_bpe
    from megatron_btm.megatron.checkpoint import save_checkpoint
    from megatron_btm.megatron.model import GPTConfig, build_model
    from megatron_btm.megatron.parallel import seed_all
    corpus = ROOT.parent / "shared" / "corpora" / "novels" / "train.jsonl"
    src = work / "text.jsonl"
    if corpus.is_file():
        with open(corpus) as f:
            src.write_text("".join(next(f) for _ in range(200)))
    else:
        src.write_text("".join('{"text": "the quick brown fox %d jumps over the lazy dog"}\n' % i
                               for i in range(2000)))
    tok = train_bpe([src], 512, work / "tokenizer.json")
    cfg = GPTConfig(num_layers=2, hidden_size=256, num_attention_heads=4, seq_length=320,
                    vocab_size=tok.vocab_size, init_method_std=0.1, init_seed=7)
    seed_all(cfg.init_seed)
    model = build_model(cfg)
    model.eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    ckpts = []
    for j in range(max(sizes)):
        g = torch.Generator().manual_seed(j)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + 0.02 * torch.randn(p.shape, generator=g))
        ckpts.append((f"x{j:02d}", save_checkpoint(work / f"expert{j:02d}", step=0, model_chunks=[model],
                                                    meta={"model_config": cfg.to_dict()})))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"cfg": cfg, "checkpoints": ckpts, "tokenizer": work / "tokenizer.json",
            "weight_bytes": weight_bytes}


def _best(fn, repeats: int) -> float:
    """Fastest of `repeats` runs: on a shared machine the least-contended one (timeit's rule)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _prior(n: int):
    import torch
    p = torch.linspace(2.0, 1.0, n, dtype=torch.float64) ** 4  # expert 0 most probable, distinct
    return p / p.sum()


def bench_forest(world, n: int, ks: list, repeats: int, eval_blocks: int) -> list[dict]:
    import torch

    from megatron_btm.inference.blocks import make_blocks
    from megatron_btm.inference.generate import SamplingConfig
    from megatron_btm.serving.pool import ExpertPool
    from megatron_btm.serving.route import Route
    from megatron_btm.serving.routed import evaluate_routed, generate_routed
    cfg, vocab = world["cfg"], world["cfg"].vocab_size
    g = torch.Generator().manual_seed(n)
    docs = [torch.randint(0, vocab, (cfg.seq_length * eval_blocks + 1,), generator=g).tolist()]
    blocks = {"d": make_blocks(docs, cfg.seq_length)}
    prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist()
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)
    rows = []
    for k in ks:
        k = n if k == "n" else k
        route = Route.parse("prior", k)
        pool = ExpertPool(world["checkpoints"][:n], capacity=k + 1)
        ev = evaluate_routed(pool, blocks, route, {"d": _prior(n)})["results"]["d"]
        generate_routed(pool, [prompt], sampling, route, _prior(n))  # warm: loads the k experts
        reps = repeats if k <= 2 else min(repeats, 2)  # the full ensemble is slow by design
        gen = [generate_routed(pool, [prompt], sampling, route, _prior(n)) for _ in range(reps)]
        gen_ms = min(r["ms_per_token"] for r in gen)
        rows.append({"n": n, "k": k, "route": "prior", "eval_ms_per_token": ev["ms_per_token"],
                     "eval_expert_forwards_per_token": ev["expert_forwards_per_token"],
                     "gen_ms_per_token": gen_ms,
                     "gen_expert_forwards_per_token": gen[0]["expert_forwards_per_token"],
                     "max_models_in_memory": pool.peak})
        print(f"n={n:<3} k={k:<3} eval {ev['ms_per_token']:.3f} ms/tok  gen {gen_ms:.3f} ms/tok", flush=True)
    pool = ExpertPool(world["checkpoints"][:n], capacity=3)
    route = Route.parse("prefix:16", 2)
    t = time.perf_counter()
    out = generate_routed(pool, [prompt], sampling, route, _prior(n))
    rows.append({"n": n, "k": 2, "route": "prefix:16", "gen_ms_per_token": out["ms_per_token"],
                 "gen_expert_forwards_per_token": out["expert_forwards_per_token"],
                 "gen_seconds_including_loads": time.perf_counter() - t,
                 "max_models_in_memory": pool.peak})
    print(f"n={n:<3} prefix:16 top-2 gen {out['ms_per_token']:.3f} ms/tok (cold: loads every expert)",
          flush=True)
    return rows


def bench_single(world, repeats: int, work: Path) -> dict:
    import torch

    from megatron_btm.inference.generate import SamplingConfig, generate
    from megatron_btm.inference.scoring import load_expert
    expert = load_expert(world["checkpoints"][0][1], name="single")
    prompt = torch.randint(0, world["cfg"].vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    cfg = SamplingConfig(max_new_tokens=LONG_NEW, temperature=0.0)
    out = {}
    tokens = {}
    for name, kv in (("kv", True), ("no_kv", False)):
        tokens[name] = generate([expert], prompt, cfg, kv_cache=kv).tokens
        out[f"single_{name}_ms_per_token"] = 1000 * _best(
            lambda: generate([expert], prompt, cfg, kv_cache=kv), repeats if kv else 2) / LONG_NEW
    out["kv_matches_no_kv"] = tokens["kv"] == tokens["no_kv"]
    short = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)
    out["single_kv_ms_per_token_64"] = 1000 * _best(
        lambda: generate([expert], prompt, short), repeats) / NEW_TOKENS
    out.update(bench_hf(world, expert, prompt, tokens["kv"], repeats, work))
    return out


def bench_hf(world, expert, prompt, our_tokens, repeats: int, work: Path) -> dict:
    import torch

    from megatron_btm.export.hf import export_checkpoint
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return {"hf_error": f"transformers not importable: {e}"}
    folder = export_checkpoint(world["checkpoints"][0][1], tokenizer=world["tokenizer"],
                               output=work / "hf")
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=LONG_NEW,
                               min_new_tokens=LONG_NEW, do_sample=False, use_cache=True,
                               pad_token_id=0)
    hf_tokens = run()[0, len(prompt):].tolist()
    return {"hf_generate_ms_per_token": 1000 * _best(run, repeats) / LONG_NEW,
            "hf_greedy_matches_ours": hf_tokens == our_tokens,
            "hf_greedy_agree_prefix": next((i for i, (a, b) in enumerate(zip(hf_tokens, our_tokens))
                                            if a != b), len(our_tokens))}


def rss_worker(args) -> None:
    """Subprocess: prefix routing over n = 64 experts, top-2 generation; print JSON."""
    import torch

    from megatron_btm.inference.generate import SamplingConfig
    from megatron_btm.serving.pool import ExpertPool
    from megatron_btm.serving.route import Route
    from megatron_btm.serving.routed import generate_routed
    work = Path(args.work)
    setup(Path(tempfile.mkdtemp(dir=work)), args.threads)
    spec = json.loads((work / "forest.json").read_text())
    ckpts = [(i, Path(p)) for i, p in spec["checkpoints"]][:args.rss_n]
    import gc

    # imports are code, not models: load them before the baseline
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.inference.contexts  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    import megatron_btm.megatron.checkpoint  # noqa: F401
    import megatron_btm.ops  # noqa: F401
    gc.collect()
    before, reset = rss_now_mb(), reset_peak_rss()
    pool = ExpertPool(ckpts, capacity=3)
    prompt = torch.randint(0, spec["vocab"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    out = generate_routed(pool, [prompt], SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0),
                          Route.parse("prefix:16", 2), _prior(len(ckpts)))
    print(json.dumps({"rss_before_mb": before, "rss_peak_mb": peak_rss_mb(), "peak_reset": reset,
                      "loads": pool.loads,
                      "max_models_in_memory": out["max_models_in_memory"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-blocks", type=int, default=2, help="blocks of seq_length per forest")
    ap.add_argument("--quick", action="store_true", help="n = 4 and 16 only, 1 repeat")
    ap.add_argument("--output", default=str(HERE / "results" / "inference.json"))
    ap.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-n", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_worker:
        rss_worker(args)
        return 0
    sizes = [4, 16] if args.quick else [4, 16, 64]
    repeats = 1 if args.quick else args.repeats
    work = Path(tempfile.mkdtemp(prefix="btm-bench-inference-"))
    setup(work, args.threads)
    t0 = time.perf_counter()
    world = make_world(work, sizes)
    print(f"made {max(sizes)} experts in {time.perf_counter() - t0:.1f} s", flush=True)
    bench_forest(world, 4, [1], 1, 1)  # warm-up (first-call costs), not reported
    rows = []
    for n in sizes:
        rows += bench_forest(world, n, [1, 2, "n"], repeats, args.eval_blocks)
    single = bench_single(world, repeats, work)
    (work / "forest.json").write_text(json.dumps({
        "checkpoints": [(i, str(p)) for i, p in world["checkpoints"]], "vocab": world["cfg"].vocab_size}))
    mb = world["weight_bytes"] / 2 ** 20
    rss = {n: rss_run(work, n, args.threads, mb) for n in sorted({4, max(sizes)})}
    results = summarise(rows, single, rss, world, args, sizes)
    write(results, Path(args.output))
    return 0


def rss_run(work: Path, n: int, threads: int, model_mb: float) -> dict:
    """Peak RSS of prefix:16 top-2 generation over n experts, in a fresh subprocess."""
    proc = subprocess.run([sys.executable, __file__, "--rss-worker", "1", "--work", str(work),
                           "--threads", str(threads), "--rss-n", str(n)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    rss["models"] = (rss["rss_peak_mb"] - rss["rss_before_mb"]) / model_mb
    return rss


def _row(rows, n, k, route="prior"):
    return next((r for r in rows if r["n"] == n and r["k"] == k and r["route"] == route), None)


def summarise(rows, single, rss, world, args, sizes) -> dict:
    big = max(sizes)
    top2 = (_row(rows, big, 2), _row(rows, 4, 2))
    return {
        "benchmark": "inference", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpus_visible": os.cpu_count(),
                    "torch_threads": args.threads,
                    "note": "shared machine: other sessions ran on the same cores; timings are noisy"},
        "model": {**{k: getattr(world["cfg"], k) for k in ("num_layers", "hidden_size", "seq_length", "vocab_size")},
                  "weight_mb": world["weight_bytes"] / 2 ** 20},
        "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS, "long_new_tokens": LONG_NEW,
        "top2_gen_ratio_n64_over_n4": top2[0]["gen_ms_per_token"] / top2[1]["gen_ms_per_token"] if big == 64 else None,
        "top1_over_single": _row(rows, big, 1)["gen_ms_per_token"] / single["single_kv_ms_per_token_64"],
        "kv_cache_speedup_256": single["single_no_kv_ms_per_token"] / single["single_kv_ms_per_token"],
        "single_vs_hf_generate": (single["hf_generate_ms_per_token"] / single["single_kv_ms_per_token"]
                                  if "hf_generate_ms_per_token" in single else None),
        "peak_rss_models_n64_k2": rss.get(64, {}).get("models"),
        "peak_rss_models_n4_k2": rss.get(4, {}).get("models"),
        "targets": {"top2_gen_ratio_n64_over_n4": "<= 1.15", "top1_over_single": "<= 1.2",
                    "kv_cache_speedup_256": ">= 5", "single_vs_hf_generate": ">= 1.0 (HF ms / our ms)",
                    "peak_rss_models_n64_k2": "<= 3"},
        "forest_rows": rows, "single": single, "rss": rss,
    }


def write(results: dict, out: Path) -> None:
    from megatron_btm.utils.io import atomic_write_json, atomic_write_text
    m = results["machine"]
    lines = ["# Inference benchmark (serving view)", "",
             f"{results['created']}; {m['cpu']} [{m['cpu_flags']}], {m['cpus_visible']} CPUs visible, "
             f"{m['torch_threads']} torch thread(s). {m['note']}.", "",
             f"Model: {results['model']}. Prompt {results['prompt_tokens']} ids, "
             f"{results['new_tokens']} new tokens (greedy), eval route = top-k of a cached prior.", "",
             "| n | k | route | eval ms/tok | eval fwd/tok | gen ms/tok | gen fwd/tok | models held |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["forest_rows"]:
        ev = f"{r['eval_ms_per_token']:.3f}" if "eval_ms_per_token" in r else "-"
        evf = f"{r['eval_expert_forwards_per_token']:.2f}" if "eval_expert_forwards_per_token" in r else "-"
        lines.append(f"| {r['n']} | {r['k']} | {r['route']} | {ev} | {evf} | {r['gen_ms_per_token']:.3f} | "
                     f"{r['gen_expert_forwards_per_token']:.2f} | {r['max_models_in_memory']} |")
    s = results["single"]
    lines += ["", "| single model (256 new tokens) | ms/token |", "|---|---|",
              f"| ours, KV cache | {s['single_kv_ms_per_token']:.3f} |",
              f"| ours, no cache | {s['single_no_kv_ms_per_token']:.3f} |",
              f"| HF generate (export-hf, use_cache) | {s.get('hf_generate_ms_per_token', float('nan')):.3f} |",
              "", f"KV and no-cache greedy identical: {s['kv_matches_no_kv']}; HF greedy identical: "
              f"{s.get('hf_greedy_matches_ours')} (agree for the first {s.get('hf_greedy_agree_prefix')} tokens).",
              "", "| key | measured | target |", "|---|---|---|"]
    for key, target in results["targets"].items():
        v = results[key]
        lines.append(f"| {key} | {'n/a' if v is None else f'{v:.3f}'} | {target} |")
    lines += ["", "Peak RSS (prefix:16, top-2, pool of 3 models; a fresh process; in units of one "
              "model's weights, over the RSS before the first load): "
              + "; ".join(f"n={n}: {r.get('models', float('nan')):.2f} ({r})" for n, r in results["rss"].items()),
              "", "A held model costs ~1.4x its weight bytes in RSS (Megatron module overhead) and the "
              "first load ~3.4x (loader state), so 3 held models measure ~7-8 units; what the pool "
              "bounds is that this does not grow with n."]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
