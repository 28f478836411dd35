"""Benchmark: `btm import-hf` of a ~120M-parameter Llama-style model vs transformers' loader.

Generates (once, into --work) a random Llama-style model of ≈124M fp32 parameters (hidden 768,
12 layers, 12 heads / 4 key-value heads, MLP 2048, vocab 32000, untied output) saved with
`save_pretrained(max_shard_size=...)` as sharded safetensors. Then each case in its own fresh
subprocess (the child's own peak RSS, VmHWM, and CPU time from wait4; wall time measured here):

  btm import-hf     `python -m megatron_btm.cli import-hf DIR --output OUT` (the whole command,
                    interpreter start-up and imports included; streaming: one tensor at a time),
                    with its torch-free writer (the default) and with `--no-torch-free`
  transformers      `AutoModelForCausalLM.from_pretrained(DIR)` in a fresh interpreter (what
                    loading the model for a conversion would cost at the least), and the same
                    with every parameter read once (mapped pages count in RSS only once touched)
  floors            each command's imports alone (`import torch`; btm import-hf's modules, either writer;
                    `import torch, transformers`), so peaks are also compared above them

Every case runs once unmeasured (page cache, .pyc files), then --repeats times interleaved; the
median of each is reported. Table on stdout; JSON + Markdown under bench/results/
import_hf.{json,md}, with the targets (peak RSS <= 0.5x and time <= 1x transformers') evaluated as
measured, whole process and above the floors.

    .venv/bin/python bench/import_hf.py [--work /tmp/btm-bench-import-hf] [--repeats 3] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LLAMA = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=2048,
             tie_word_embeddings=False)
HF_LOAD = ("import sys, torch; from transformers import AutoModelForCausalLM; "
           "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
           "print(sum(p.numel() for p in m.parameters()), next(m.parameters()).dtype)")
# the same, then every parameter read once (what converting the loaded model costs at the least):
# from_pretrained may leave the weights as lazily mapped file pages, counted only once touched
HF_LOAD_READ = HF_LOAD.replace("print(", "print(sum(float(p.sum()) for p in m.parameters()), ")
# import floors: each command's interpreter + the modules it imports, no model
FLOOR_TORCH = "import torch"
FLOOR_BTM = ("import megatron_btm.cli, megatron_btm.hf.cli, megatron_btm.hf.importer, "
             "megatron_btm.hf.torchfree, megatron_btm.hf.megatron_lm, megatron_btm.export.hf, "
             "megatron_btm.megatron.model")  # GPTConfig's module (it imports torch today)
FLOOR_BTM_TORCH = ("import torch, megatron_btm.cli, megatron_btm.hf.cli, megatron_btm.hf.importer, "
                   "megatron_btm.hf.megatron_lm, megatron_btm.averaging.torch_dist, megatron_btm.export.hf, "
                   "megatron_btm.megatron.checkpoint")
FLOOR_HF = "import torch, transformers; from transformers import AutoModelForCausalLM"
BTM, BTM_TORCH, HF, HF_READ = ("btm import-hf", "btm import-hf --no-torch-free",
                               "transformers from_pretrained",
                               "transformers from_pretrained + read every parameter")
FLOORS = {BTM: "floor: btm import-hf's imports",
          BTM_TORCH: "floor: btm import-hf --no-torch-free's imports",
          HF: "floor: import torch, transformers",
          HF_READ: "floor: import torch, transformers", "torch": "floor: import torch"}


def make_model(folder: Path, shard: str) -> int:
    """The model folder, made in a child process: this process must stay small, since a
    measured child forked from it starts with its resident set (ru_maxrss would count it)."""
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--make-model", str(folder), "--shard", shard],
                       check=True, cwd=REPO)
    return json.loads((folder / "params.json").read_text())["params"]


def _make_model(folder: Path, shard: str) -> None:
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).float()
    params = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard)
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    os.replace(tmp, folder)


def cpu_flags() -> list[str]:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "sse4")))


def measured(cmd: list[str], env: dict) -> dict:
    """Run `cmd`; its own peak RSS (VmHWM: ru_maxrss from wait4 of this child alone) and CPU."""
    load = round(os.getloadavg()[0], 1)
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{cmd[:4]}... exited {proc.returncode}:\n{log.read()[-3000:].decode()}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "loadavg_start": load}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("inf")


def verdicts(med: dict, ours: str = BTM) -> dict:
    """The targets (peak RSS <= 0.5x, wall <= 1x transformers'), evaluated as measured, whole
    process and above each command's own import floor."""
    a = med[ours]
    a_above = a["peak_rss_mib"] - med[FLOORS[ours]]["peak_rss_mib"]
    out = {}
    for tag, name in (("from_pretrained", HF), ("from_pretrained_read", HF_READ)):
        b = med[name]
        b_above = b["peak_rss_mib"] - med[FLOORS[name]]["peak_rss_mib"]
        out[tag] = {"rss_ratio": _ratio(a["peak_rss_mib"], b["peak_rss_mib"]),
                    "rss_above_floor_mib": [round(a_above, 1), round(b_above, 1)],
                    "rss_above_floor_ratio": _ratio(a_above, b_above),
                    "wall_ratio": _ratio(a["wall_s"], b["wall_s"]),
                    "cpu_ratio": _ratio(a["cpu_s"], b["cpu_s"]),
                    "target_rss_le_0.5x": a["peak_rss_mib"] <= 0.5 * b["peak_rss_mib"],
                    "target_rss_above_floor_le_0.5x": a_above <= 0.5 * b_above,
                    "target_wall_le_1x": a["wall_s"] <= b["wall_s"]}
    torch_floor = med[FLOORS["torch"]]["peak_rss_mib"]
    out["torch_floor"] = {"import_torch_mib": torch_floor,
                          "half_of_from_pretrained_mib": round(0.5 * med[HF]["peak_rss_mib"], 1),
                          "whole_process_0.5x_reachable_while_importing_torch":
                              torch_floor <= 0.5 * med[HF]["peak_rss_mib"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/btm-bench-import-hf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard", default="100MB", help="save_pretrained max_shard_size")
    p.add_argument("--keep", action="store_true", help="keep the generated model")
    p.add_argument("--make-model", metavar="DIR", help=argparse.SUPPRESS)  # the child of make_model
    args = p.parse_args(argv)
    if args.make_model:
        _make_model(Path(args.make_model), args.shard)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    params = make_model(hf, args.shard)
    shards = sorted(x.name for x in hf.glob("*.safetensors"))
    size = sum((hf / s).stat().st_size for s in shards)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    out = work / "ckpt"

    def ours(*flags):
        def run():
            shutil.rmtree(out, ignore_errors=True)
            return measured([sys.executable, "-m", "megatron_btm.cli", "import-hf", str(hf),
                             "--output", str(out), *flags], env)
        return run

    py = lambda code, *a: (lambda: measured([sys.executable, "-c", code, *a], env))  # noqa: E731
    cases = {BTM: ours(), BTM_TORCH: ours("--no-torch-free"), HF: py(HF_LOAD, str(hf)),
             HF_READ: py(HF_LOAD_READ, str(hf)), FLOORS["torch"]: py(FLOOR_TORCH),
             FLOORS[BTM]: py(FLOOR_BTM), FLOORS[BTM_TORCH]: py(FLOOR_BTM_TORCH), FLOORS[HF]: py(FLOOR_HF)}
    for run in cases.values():  # warm-up: page cache, .pyc files
        run()
    runs = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved: load changes on a shared machine hit all alike
        for name, run in cases.items():
            runs[name].append(run())
    med = {k: {f: round(statistics.median(r[f] for r in v), 2) for f in ("wall_s", "peak_rss_mib", "cpu_s")}
           for k, v in runs.items()}
    verdict = verdicts(med)
    verdict["torch_writer"] = verdicts(med, BTM_TORCH)
    verdict["torch_writer"].pop("torch_floor")
    loads = [r["loadavg_start"] for v in runs.values() for r in v]
    head = (f"Llama-style model, {params / 1e6:.1f}M fp32 parameters, {len(shards)} safetensors shards "
            f"({size / 2**20:.0f} MiB); median of {args.repeats} fresh subprocesses per case, "
            f"interleaved, after one unmeasured warm-up of each (page cache warm); "
            f"{os.cpu_count()} CPUs visible ({platform.processor() or platform.machine()}; flags "
            f"{' '.join(cpu_flags())}); 1-min load average {min(loads)}-{max(loads)} at the runs' starts. "
            f"{'A shared machine: other jobs were running, so wall times are under load and noisy (CPU s is less so)' if max(loads) > 2 else 'A quiet machine (load average <= 2)'}; "
            f"peak RSS is the child's own VmHWM and is not affected by load.")
    rows = ["| case | wall s | peak RSS MiB | CPU s | runs (wall s / RSS MiB / load) |", "|---|---|---|---|---|"]
    for k, v in runs.items():
        each = ", ".join(f"{r['wall_s']}/{r['peak_rss_mib']}/{r['loadavg_start']}" for r in v)
        rows.append(f"| {k} | {med[k]['wall_s']} | {med[k]['peak_rss_mib']} | {med[k]['cpu_s']} | {each} |")
    targets = []
    for who, tag in [(BTM, t) for t in ("from_pretrained", "from_pretrained_read")] + \
            [(BTM_TORCH, t) for t in ("from_pretrained", "from_pretrained_read")]:
        v = verdict[tag] if who == BTM else verdict["torch_writer"][tag]
        targets.append(f"- {who} vs {tag}: peak RSS {v['rss_ratio']}x whole process (target <= 0.5x: "
                       f"{str(v['target_rss_le_0.5x']).lower()}), {v['rss_above_floor_ratio']}x above "
                       f"each one's import floor ({v['rss_above_floor_mib'][0]} vs "
                       f"{v['rss_above_floor_mib'][1]} MiB; <= 0.5x: "
                       f"{str(v['target_rss_above_floor_le_0.5x']).lower()}); wall {v['wall_ratio']}x "
                       f"(target <= 1x: {str(v['target_wall_le_1x']).lower()}), CPU "
                       f"time {v['cpu_ratio']}x")
    tf = verdict["torch_floor"]
    targets.append(f"- `import torch` alone peaks at {tf['import_torch_mib']} MiB; half of "
                   f"from_pretrained's peak is {tf['half_of_from_pretrained_mib']} MiB, so a whole-process "
                   f"ratio <= 0.5x is {'reachable' if tf['whole_process_0.5x_reachable_while_importing_torch'] else 'not reachable'} "
                   f"by any importer that imports torch.")
    notes = ("All are whole processes: interpreter start-up and imports are included in wall time "
             "and RSS; the floor rows are each command's imports alone (neither btm writer imports "
             "transformers or megatron.core; the torch-free path imports no torch at all: the "
             "'btm import-hf's imports' floor row). "
             "btm import-hf reads each tensor with "
             "readinto straight into its Megatron layout in one reused buffer (the embedding and "
             "output tables in 16 MiB row slices) and appends it to the torch_dist checkpoint "
             "(fsynced), so its peak above the floor is about one buffer; the torch-free writer "
             "writes the same files (hf/torchfree.py). transformers' "
             "from_pretrained can leave the weights as mapped file pages that count in RSS only "
             "once read, so the second transformers row reads every parameter once.")
    table = "\n".join([head, "", *rows, "", *targets, "", notes])
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"model": LLAMA, "params": params, "shards": len(shards), "bytes": size,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
               "cpu_flags": cpu_flags(), "loadavg_end": os.getloadavg(), "shared_machine": True,
               "statistic": f"median of {args.repeats}", "runs": runs, "median": med, "verdict": verdict}
    (RESULTS / "import_hf.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "import_hf.md").write_text("# bench/import_hf.py\n\n" + table + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
