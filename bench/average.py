"""Benchmark: streaming parameter averaging of 8 GPT-2-small-sized experts vs mergekit.

Builds 8 synthetic experts of ≈124M fp32 parameters (GPT-2 small shapes: 12 layers, hidden 768,
vocab 50257, 1024 positions; random values), each written twice: as our torch_dist checkpoint
(Megatron key names and per-layer chunk layout, as a TP=1 Megatron save) and as an HF GPT-2
safetensors folder holding the same values (converted by the project's exporter,
megatron_btm.export.gpt2). Then, each case in its own subprocess, with the
page cache dropped before each case where the kernel allows it:

  disk-read      read every file of the 8 torch_dist checkpoints once (sequential throughput)
  btm average    the `btm average --checkpoint ...` command (uniform weights; the whole process,
                 start-up included), timings split read/accumulate/write
  mergekit       `mergekit-yaml` linear merge (uniform), without and with --lazy-unpickle

Wall time and peak RSS (os.wait4's ru_maxrss of the child) per case; the outputs are compared
against each other. Table on stdout; JSON + Markdown under bench/results/.

mergekit lives in its own venv (bench/.venv/mergekit, created on first use with
`pip install torch==<ours> mergekit`: torch pinned so pip takes the local CPU wheel).

    .venv/bin/python bench/average.py [--experts 8] [--work /tmp/btm-bench-average] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MERGEKIT_VENV = REPO / "bench" / ".venv" / "mergekit"
GPT2 = dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024, vocab_size=50257)


# ---------------------------------------------------------------- synthetic experts
def megatron_shapes(c=GPT2) -> dict[str, tuple[int, ...]]:
    L, h, f = c["num_layers"], c["hidden_size"], 4 * c["hidden_size"]
    p = "decoder.layers."
    return {
        "embedding.word_embeddings.weight": (c["vocab_size"], h),
        "embedding.position_embeddings.weight": (c["seq_length"], h),
        p + "self_attention.linear_qkv.layer_norm_weight": (L, h),
        p + "self_attention.linear_qkv.layer_norm_bias": (L, h),
        p + "self_attention.linear_qkv.weight": (L, 3 * h, h),
        p + "self_attention.linear_qkv.bias": (L, 3 * h),
        p + "self_attention.linear_proj.weight": (L, h, h),
        p + "self_attention.linear_proj.bias": (L, h),
        p + "mlp.linear_fc1.layer_norm_weight": (L, h),
        p + "mlp.linear_fc1.layer_norm_bias": (L, h),
        p + "mlp.linear_fc1.weight": (L, f, h),
        p + "mlp.linear_fc1.bias": (L, f),
        p + "mlp.linear_fc2.weight": (L, h, f),
        p + "mlp.linear_fc2.bias": (L, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.final_layernorm.bias": (h,),
    }


def write_random_tp1(ckpt_dir: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> dict:
    """Random N(0, 0.02) tensors under Megatron keys, written as a weights-only torch_dist
    checkpoint in Megatron's TP=1 layout (one chunk per layer); returns the tensors by key."""
    import torch

    from megatron_btm.averaging.torch_dist import TorchDistWriter
    g = torch.Generator().manual_seed(seed)
    writer, state = TorchDistWriter(ckpt_dir), {}
    for key, shape in shapes.items():
        t = state[key] = torch.randn(shape, generator=g) * 0.02
        writer.declare_tensor(key, t.shape, t.dtype)
        if key.startswith("decoder.layers."):  # Megatron TP=1 layout: one chunk per layer
            for i in range(shape[0]):
                writer.write_chunk(key, (i,) + (0,) * (len(shape) - 1), t[i : i + 1])
        else:
            writer.write_chunk(key, (0,) * len(shape), t)
    writer.finish({})
    return state


def write_expert(seed: int, ckpt_dir: Path, hf_dir: Path) -> int:
    """One random expert in both formats; returns its parameter count."""
    from safetensors.torch import save_file

    from megatron_btm.export.gpt2 import megatron_to_gpt2
    state = write_random_tp1(ckpt_dir, megatron_shapes(), seed)
    n = sum(t.numel() for t in state.values())
    hf = megatron_to_gpt2(state, num_layers=GPT2["num_layers"], num_heads=GPT2["num_attention_heads"],
                          vocab_size=GPT2["vocab_size"], tie_embeddings=True)
    del state
    (ckpt_dir / "meta.json").write_text(json.dumps({
        "format": "torch_dist", "weights_only": True, "parallel": {"tp": 1, "pp": 1},
        "model_config": dict(GPT2, tie_embeddings=True, make_vocab_size_divisible_by=1)}))
    hf_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "n_ctx": 1024, "vocab_size": 50257,
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32"}))
    return n


# ---------------------------------------------------------------- measurement
def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


WAIT = {"load": None, "max_s": 0.0}


def wait_for_quiet() -> float:
    """On a shared machine, wait (up to --wait-max s) for the 1-min load average to fall below
    --wait-load before a case starts; return the load average the case started at."""
    deadline = time.monotonic() + WAIT["max_s"]
    while WAIT["load"] is not None and os.getloadavg()[0] > WAIT["load"] and time.monotonic() < deadline:
        time.sleep(5)
    return round(os.getloadavg()[0], 1)


def run_measured(cmd: list[str], *, env=None, warm: list[str] | None = None) -> dict:
    """Drop the page cache, re-warm the interpreter's own imports (`warm`: a command importing
    the libraries, so the case measures checkpoint I/O, not reading torch's .so files from a
    cold disk), then run `cmd` under /usr/bin/time for its peak RSS.

    /usr/bin/time reports the child's own ru_maxrss: measuring with wait4 from this process
    would not do, because Linux carries the high-water mark across fork+exec, so every child
    would start at this (large) process's RSS.
    """
    load = wait_for_quiet()
    dropped = drop_caches()
    if warm:
        subprocess.run(warm, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = "BENCH_RUSAGE"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", f"{marker} %M %U %S", *cmd], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]}... exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)][-1]
    maxrss_kb, user, system = line.split()[1:]
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(int(maxrss_kb) / 1024, 1),
            "cpu_s": round(float(user) + float(system), 2), "caches_dropped": dropped, "loadavg_start": load,
            "output": proc.stdout}


READ_SCRIPT = """
import os, sys, time
buf = bytearray(16 << 20); n = 0; t = time.perf_counter()
for root in sys.argv[1:]:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), 'rb', buffering=0) as f:
                while (k := f.readinto(buf)):
                    n += k
print("READ", n, time.perf_counter() - t)
"""


def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    import torch
    pin = torch.__version__.split("+")[0]
    print(f"creating {MERGEKIT_VENV} (mergekit + torch=={pin}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "-q", f"torch=={pin}", "mergekit"], check=True)
    return exe


def mergekit_case(exe: Path, hf_dirs: list[Path], out: Path, lazy: bool) -> dict:
    import yaml
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(d), "parameters": {"weight": 1.0 / len(hf_dirs)}} for d in hf_dirs]}
    cfg_path = out.parent / f"{out.name}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [str(exe), str(cfg_path), str(out), "--no-copy-tokenizer", "--allow-crimes"]
    cmd.append("--lazy-unpickle" if lazy else "--no-lazy-unpickle")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    warm = [str(exe.parent / "python"), "-c", "import mergekit.merge, mergekit.scripts.run_yaml"]
    return run_measured(cmd, env=env, warm=warm)


def compare_outputs(ours: Path, theirs: Path) -> float:
    """max |ours − mergekit| over the embedding and one transposed MLP weight."""
    from safetensors import safe_open

    from megatron_btm.averaging.torch_dist import TorchDistReader
    r = TorchDistReader(ours)
    files = sorted(theirs.glob("*.safetensors"))
    hf = {}
    for f in files:
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                if k in ("transformer.wte.weight", "wte.weight", "transformer.h.3.mlp.c_proj.weight", "h.3.mlp.c_proj.weight"):
                    hf[k.removeprefix("transformer.")] = s.get_tensor(k)
    d1 = (r.read_tensor("embedding.word_embeddings.weight") - hf["wte.weight"]).abs().max().item()
    d2 = (r.read_tensor("decoder.layers.mlp.linear_fc2.weight")[3].T - hf["h.3.mlp.c_proj.weight"]).abs().max().item()
    return max(d1, d2)


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--work", default="/tmp/btm-bench-average", help="scratch folder (≈1 GB per expert)")
    ap.add_argument("--keep", action="store_true", help="keep the experts and outputs")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--wait-load", type=float, help="before each case, wait for the 1-min load average to drop below this")
    ap.add_argument("--wait-max", type=float, default=120.0, help="longest wait per case, seconds")
    args = ap.parse_args(argv)
    WAIT.update(load=args.wait_load, max_s=args.wait_max)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        exe = None if args.skip_mergekit else ensure_mergekit()
        t0 = time.perf_counter()
        ckpts = [work / "btm" / f"expert{i}" for i in range(args.experts)]
        hfs = [work / "hf" / f"expert{i}" for i in range(args.experts)]
        params = [write_expert(100 + i, c, h) for i, (c, h) in enumerate(zip(ckpts, hfs))]
        gen_s = time.perf_counter() - t0
        ckpt_bytes = sum(p.stat().st_size for c in ckpts for p in c.rglob("*") if p.is_file())
        print(f"{args.experts} experts × {params[0] / 1e6:.1f}M params written in {gen_s:.0f} s "
              f"({ckpt_bytes / 2**30:.2f} GiB torch_dist)", flush=True)

        cases = {}
        r = run_measured([py, "-c", READ_SCRIPT, *map(str, ckpts)], env=env)
        nbytes, secs = [ln for ln in r["output"].splitlines() if ln.startswith("READ")][0].split()[1:]
        cases[f"disk read ({args.experts} torch_dist ckpts)"] = dict(r, read_gib_s=round(int(nbytes) / float(secs) / 2**30, 3))
        print("disk read done", flush=True)
        r = run_measured([py, "-m", "megatron_btm.cli", "average", "--checkpoint", *map(str, ckpts),
                          "--output", str(work / "out-btm"), "--no-progress"], env=env,
                         warm=[py, "-c", "import megatron_btm.averaging.apply"])
        out = r["output"]  # the command prints its summary as a JSON object
        start = 0 if out.startswith("{") else out.index("\n{") + 1
        summary = json.JSONDecoder().raw_decode(out, start)[0]
        cases["btm average (streaming)"] = dict(r, breakdown={k: summary[k] for k in
                                                               ("read_s", "read_wait_s", "accumulate_s", "write_s", "write_wait_s", "finish_s", "wall_s")},
                                                bytes_read=summary["bytes_read"])
        print("btm average done", flush=True)
        if exe:
            for lazy in (False, True):
                name = f"mergekit linear{' --lazy-unpickle' if lazy else ''}"
                out = work / f"out-mergekit{'-lazy' if lazy else ''}"
                cases[name] = mergekit_case(exe, hfs, out, lazy)
                cases[name]["max_abs_diff_vs_btm"] = compare_outputs(work / "out-btm", out)
                print(name, "done", flush=True)
        for c in cases.values():
            c["output_tail"] = c.pop("output")[-400:]
        report = write_report(cases, params[0], args.experts, ckpt_bytes)
        print(report)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def write_report(cases: dict, params: int, n: int, ckpt_bytes: int) -> str:
    ours = cases["btm average (streaming)"]
    mk = {k: v for k, v in cases.items() if k.startswith("mergekit")}
    rows = ["| case | wall s | peak RSS MiB | CPU s | load avg at start | notes |", "|---|---:|---:|---:|---:|---|"]
    for name, c in cases.items():
        note = ""
        if "read_gib_s" in c:
            note = f"{c['read_gib_s']} GiB/s"
        if "breakdown" in c:
            b = c["breakdown"]
            note = (f"in-process {b['wall_s']} s; overlapped stages: read {b['read_s']} s busy "
                    f"({ours['bytes_read'] / b['read_s'] / 2**30:.2f} GiB/s), main thread waited "
                    f"{b['read_wait_s']} s for reads and {b['write_wait_s']} s for writes; accumulate "
                    f"{b['accumulate_s']} s; write {b['write_s']} s busy + finish {b['finish_s']} s")
        if "max_abs_diff_vs_btm" in c:
            note = f"max abs diff vs btm output {c['max_abs_diff_vs_btm']:.1e}"
        rows.append(f"| {name} | {c['wall_s']} | {c['peak_rss_mib']} | {c['cpu_s']} | {c['loadavg_start']} | {note} |")
    verdict = {}
    if mk:
        best_wall = min(c["wall_s"] for c in mk.values())
        best_rss = min(c["peak_rss_mib"] for c in mk.values())
        verdict = {"wall_ratio_vs_best_mergekit": round(ours["wall_s"] / best_wall, 3),
                   "rss_ratio_vs_best_mergekit": round(ours["peak_rss_mib"] / best_rss, 3),
                   "target_wall_le_0.5x": ours["wall_s"] <= 0.5 * best_wall,
                   "target_rss_le_best": ours["peak_rss_mib"] <= best_rss}
    head = (f"{n} experts × {params / 1e6:.1f}M fp32 params ({ckpt_bytes / 2**30:.2f} GiB on disk); "
            f"page cache dropped before each case: {ours['caches_dropped']}; "
            f"{os.cpu_count()} CPUs visible; load average at the end "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine: other jobs were running)")
    notes = ("Notes: mergekit's --lazy-unpickle only changes how it reads PyTorch .bin pickles; these "
             "inputs are safetensors (HF's default), so its two rows differ by noise only. mergekit "
             "keeps the merged model in memory until it writes its output shard; btm average streams "
             "each tensor out as soon as it is averaged. btm's stages overlap (read / accumulate / "
             "write run in 3 threads), so their busy times add up to more than the wall time.")
    table = "\n".join([head, "", *rows, "", json.dumps(verdict), "", notes])
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"experts": n, "params_per_expert": params, "checkpoint_bytes": ckpt_bytes,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(), "cases": cases, "verdict": verdict}
    (RESULTS / "average.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "average.md").write_text("# bench/average.py\n\n" + table + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
