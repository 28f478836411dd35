"""Benchmark of the fused ensemble-logit mixing op (megatron_btm.ops.mix_nll) against the naive
PyTorch expression and a read-bandwidth roofline, on CPU (default) or one CUDA device.

For every (k experts, N tokens, V vocab, dtype) case and every method, a fresh subprocess
allocates the logits, then times the method; its peak *extra* memory is measured as
  CPU:  ru_maxrss after the runs − ru_maxrss right after the logits were allocated and filled
        in place (no temporary, so that baseline equals the resident size of the inputs);
  CUDA: torch.cuda.max_memory_allocated() − memory_allocated() after allocation.
Methods:
  naive     log_softmax per expert (fp32), gather the targets, logsumexp over experts
  fused     ops.mix_nll (nll and expert log-likelihoods; forward only), once per CPU SIMD path
            in --paths (a forced path runs with the environment of FORCE_PATH; column
            "fused[<path>]"; the first path is also "fused")
  roofline  CPU: one amax pass over the same bytes (bf16 logits viewed as fp32, since torch's
            bf16 amax is compute-bound); CUDA: a device-to-device copy of the logits.
A case whose naive expression would not fit in --mem-budget-gb is reported as skipped.

    taskset -c 0,1 python bench/mixing.py            # full grid, 2 threads
    python bench/mixing.py --quick                   # small grid (smoke)
    python bench/mixing.py --grid headline --paths all   # k=8 N=4096 cases, every SIMD path
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 1024 ** 3
# Environment that forces each CPU SIMD path of the extension (csrc/mixing_cpu_simd.h).
FORCE_PATH = {"avx512-intrinsics": {}, "avx2-intrinsics": {"BTM_MIXING_NO_AVX512": "1"},
              "auto-vectorised": {"BTM_MIXING_NO_AVX512": "1", "BTM_MIXING_NO_AVX2": "1"}}
GRIDS = {  # (dtypes, ks, Ns, Vs)
    "full": (("fp32", "bf16"), [2, 8, 16], [1024, 4096], [32000, 50257]),
    "quick": (("fp32", "bf16"), [2, 8], [256], [32000]),
    "headline": (("fp32", "bf16"), [8], [4096], [32000]),
}


def _bytes_per(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2}[dtype]


def _extra_estimate(method: str, k: int, n: int, v: int, dtype: str) -> int:
    """Bytes a method allocates beyond the logits (upper estimate used for skipping)."""
    if method == "naive":  # fp32 log_softmax output (+ the fp32 upcast for bf16)
        return k * n * v * 4 * (1 if dtype == "fp32" else 2)
    return k * n * 64  # O(k·N) statistics


# ---------------------------------------------------------------- worker (one subprocess)

def _naive(logits, lw, targets):
    import torch
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [K, N, V] fp32
    ll = logp.gather(-1, targets.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
    return -torch.logsumexp(lw + ll.t(), dim=-1), ll


def worker(args) -> dict:
    import torch
    from megatron_btm import ops
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    k, n, v = args.k, args.n, args.v
    logits = torch.empty(k, n, v, dtype=dt, device=dev)
    for j in range(k):  # in place, expert by expert: no temporary of the logits' size
        logits[j].normal_(0.0, 3.0)
    lw = torch.log_softmax(torch.randn(n, k, device=dev), dim=-1)
    targets = torch.randint(0, v, (n,), device=dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # One tiny call of each path first: lazy imports and op registration are not the method's
    # memory.
    tiny = logits[:, :2, :64].contiguous()
    _naive(tiny, lw[:2], targets[:2] % 64)
    ops.mix_nll(tiny, lw[:2], targets[:2] % 64)
    del tiny
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    if cuda:
        dst = torch.empty_like(logits)
        roof = lambda: dst.copy_(logits)  # noqa: E731
    else:
        flat = logits.view(-1)  # one pass over all bytes; bf16 pairs read as fp32 words
        flat = flat.view(torch.float32) if dt == torch.bfloat16 else flat
        roof = lambda: flat.amax()  # noqa: E731
    if args.method == "naive":
        fn = lambda: _naive(logits, lw, targets)  # noqa: E731
    elif args.method == "fused":
        fn = lambda: ops.mix_nll(logits, lw, targets)  # noqa: E731
    else:
        fn = roof

    def timed(f):  # (wall s, process CPU s: all threads, descheduled time excluded)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = f()
        sync()
        del out
        return time.perf_counter() - t0, time.process_time() - c0

    times, cpu, paired, paired_cpu = [], [], [], []
    for i in range(args.warmup + args.reps):
        t, c = timed(fn)
        # fused on CPU: a roofline pass right after each run, so fused / read pass is a ratio of
        # neighbouring timings (the machine is shared: its load drifts between subprocesses).
        p, pc = timed(roof) if args.method == "fused" and not cuda else (None, None)
        if i >= args.warmup:
            times.append(t)
            cpu.append(c)
            if p is not None:
                paired.append(p)
                paired_cpu.append(pc)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    res = {"time_s": min(times), "times_s": times, "peak_extra_mb": max(peak, 0) / 2**20,
           "backend": ops.backend(dev)}
    if args.method == "fused" and not cuda and res["backend"] == "cpp-openmp":
        import megatron_btm._mixing_cpu as ext
        res["simd_path"] = ext.simd_path()
    res["cpu_time_s"] = min(cpu)
    if paired:
        res["paired_roofline_s"] = min(paired)
        res["over_paired_roofline"] = min(times) / min(paired)
        # CPU seconds (both threads) against the paired read pass's: what a loaded machine
        # does not inflate by descheduling (it still shares memory bandwidth).
        res["cpu_over_paired_roofline"] = min(cpu) / min(paired_cpu)
    if args.method == "fused":  # sanity: agrees with the fp64 reference on a few tokens
        nll, _ = ops.mix_nll(logits[:, :8], lw[:8], targets[:8])
        ref, _ = ops.reference.mix_nll(logits[:, :8].double(), lw[:8].double(), targets[:8])
        res["max_abs_err_first8"] = float((nll.double() - ref).abs().max())
    return res


# ---------------------------------------------------------------- driver

def run_case(method, k, n, v, dtype, a, force_env=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method,
           "--k", str(k), "--n", str(n), "--v", str(v), "--dtype", dtype,
           "--device", a.device, "--threads", str(a.threads),
           "--warmup", str(0 if method == "naive" else 1),
           "--reps", str(2 if method == "naive" else a.reps)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(a.threads), **(force_env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["rc=%d" % proc.returncode]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["naive", "fused", "roofline"])
    p.add_argument("--k", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="timed reps (fused, roofline)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (CPU)")
    p.add_argument("--quick", action="store_true", help="small grid, for a smoke run")
    p.add_argument("--grid", choices=list(GRIDS), default=None,
                   help="case grid (default full; --quick = quick)")
    p.add_argument("--paths", default="native",
                   help="CPU SIMD paths for the fused column, comma-separated from "
                        f"{list(FORCE_PATH)}, or 'native' (the CPU's own) or 'all' (every path "
                        "this CPU runs)")
    p.add_argument("--methods", default="roofline,fused,naive",
                   help="comma-separated subset of roofline,fused,naive")
    p.add_argument("--mem-budget-gb", type=float, default=14.0,
                   help="skip a method whose logits + extra memory would exceed this (GiB)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "mixing.json"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return 0

    sys.path.insert(0, ROOT)
    from megatron_btm.utils.io import atomic_write_json, atomic_write_text
    dtypes, ks, ns, vs = GRIDS[a.grid or ("quick" if a.quick else "full")]
    methods = [m for m in ("roofline", "fused", "naive") if m in a.methods.split(",")]
    paths = _resolve_paths(a.paths) if a.device == "cpu" else ["native"]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg(), "device": a.device, "threads": a.threads,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "mem_budget_gb": a.mem_budget_gb,
            "memory_method": ("peak extra = ru_maxrss after the runs − ru_maxrss after the logits "
                              "were allocated and filled in place, one subprocess per (case, "
                              "method)" if a.device == "cpu" else
                              "torch.cuda.max_memory_allocated − allocated after the inputs"),
            "timing": (f"min over reps (naive: 2 reps, no warm-up; others: 1 warm-up + {a.reps} "
                       "reps); fused on CPU also times a roofline pass after each of its runs "
                       "(paired ratio)"),
            "roofline": ("one amax pass over the same bytes (bf16 viewed as fp32)"
                         if a.device == "cpu" else "device-to-device copy of the logits"),
            "cpu_model": _cpuinfo("model name"), "cpu_flags": _cpuinfo("flags"),
            "nproc": os.cpu_count(), "fused_paths": paths}
    try:
        import torch
        meta["torch"] = torch.__version__
        meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        import megatron_btm._mixing_cpu as ext
        meta["cpu_simd_path"] = ext.simd_path()  # avx512-intrinsics | auto-vectorised
    except ImportError:
        pass
    rows = []
    for dtype in dtypes:
        for k in ks:
            for n in ns:
                for v in vs:
                    logits_b = k * n * v * _bytes_per(dtype)
                    row = {"k": k, "N": n, "V": v, "dtype": dtype, "logits_gb": logits_b / GIB}
                    for m in methods:
                        need = logits_b + (logits_b if m == "roofline" and a.device != "cpu"
                                           else _extra_estimate(m, k, n, v, dtype))
                        budget = min(a.mem_budget_gb * GIB, 0.8 * _available_bytes(a.device))
                        for path in (paths if m == "fused" else ["native"]):
                            key = m if path == "native" else f"{m}[{path}]"
                            if need > budget:
                                row[key] = {"skipped": f"needs ~{need / GIB:.1f} GiB > budget "
                                                       f"{budget / GIB:.1f} GiB"}
                            else:
                                row[key] = run_case(m, k, n, v, dtype, a, FORCE_PATH.get(path))
                        if m == "fused" and paths[0] != "native":
                            row["fused"] = row[f"fused[{paths[0]}]"]
                    _derive(row, logits_b)
                    rows.append(row)
                    print(_fmt(row), flush=True)
    meta["loadavg_end"] = os.getloadavg()
    result = {"meta": meta, "cases": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    atomic_write_json(a.out, result)
    atomic_write_text(os.path.splitext(a.out)[0] + ".md", _markdown(result))
    print(f"wrote {a.out}")
    return 0


def _cpuinfo(field: str) -> str | None:
    """The first `field : value` line of /proc/cpuinfo (model name, flags), None off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _resolve_paths(spec: str) -> list[str]:
    if spec == "native":
        return ["native"]
    if spec == "all":
        code = "import torch, megatron_btm._mixing_cpu as e; print(e.simd_path())"
        found = []
        for path, env in FORCE_PATH.items():  # what each forcing gives on this CPU
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": ROOT, **env})
            got = proc.stdout.strip()
            if proc.returncode == 0 and got == path:
                found.append(path)
        return found or ["native"]
    paths = spec.split(",")
    bad = [p for p in paths if p not in FORCE_PATH]
    if bad:
        raise ValueError(f"--paths: {bad} not in {list(FORCE_PATH)} (or 'native' / 'all')")
    return paths


def _available_bytes(device: str) -> float:
    """Memory free now (the machine is shared: others' jobs count)."""
    if device == "cpu":
        import psutil
        return psutil.virtual_memory().available
    import torch
    return torch.cuda.mem_get_info()[0]


def _t(row, m):
    return row.get(m, {}).get("time_s")


def _derive(row, logits_b) -> None:
    for key in [k for k in row if k.startswith("fused[")]:
        if _t(row, key) and _t(row, "roofline"):
            row[f"{key}_over_roofline"] = _t(row, key) / _t(row, "roofline")
    fused, naive, roof = _t(row, "fused"), _t(row, "naive"), _t(row, "roofline")
    if fused:
        row["fused_read_gbps"] = logits_b / fused / 1e9
    if fused and naive:
        row["speedup_vs_naive"] = naive / fused
    if fused and roof:
        # CPU: fused time / one read pass; CUDA: achieved read GB/s / copy GB/s (r+w bytes).
        row["fused_over_roofline"] = fused / roof
        if roof and "cuda" in str(row.get("fused", {}).get("backend")):
            row["fraction_of_copy_bw"] = (logits_b / fused) / (2 * logits_b / roof)


def _cell(row, m):
    r = row.get(m)
    if not r:
        return "-"
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "error"
    return f"{r['time_s']:.3f}s/{r['peak_extra_mb']:.0f}MB"


def _fused_keys(paths) -> list[tuple[str, str]]:
    """(row key, label) of each fused column."""
    return [("fused", "fused")] if paths == ["native"] else [(f"fused[{p}]", f"fused {p}")
                                                             for p in paths]


def _ratio(row, key) -> str:
    """fused / roofline (separate subprocesses), then fused / the paired roofline in wall time and
    in CPU time."""
    ro = row.get("fused_over_roofline" if key == "fused" else f"{key}_over_roofline")
    pr = row.get(key, {}).get("over_paired_roofline")
    pc = row.get(key, {}).get("cpu_over_paired_roofline")
    return (f"{ro:.2f}" if ro else "-") + (f" / {pr:.2f} / {pc:.2f}" if pr and pc else "")


def _fmt(row) -> str:
    sp = row.get("speedup_vs_naive")
    keys = [k for k in row if k.startswith("fused[") and not k.endswith("_over_roofline")]
    fused = "  ".join(f"{key} {_cell(row, key)} ({_ratio(row, key)}x read)"
                      for key in keys or ["fused"])
    return (f"k={row['k']:>2} N={row['N']:>4} V={row['V']:>5} {row['dtype']}  "
            f"naive {_cell(row, 'naive'):>18}  roofline {_cell(row, 'roofline'):>16}  {fused}  "
            f"speedup {sp and f'{sp:.1f}x' or '-'}")


def _markdown(result) -> str:
    m = result["meta"]
    cols = _fused_keys(m.get("fused_paths", ["native"]))
    lines = [f"# mixing benchmark ({m['device']}, {m['threads']} threads, {m['date']})", "",
             f"CPU: {m.get('cpu_model')}, {m.get('nproc')} cores visible, shared with other "
             f"sessions (timings are under that load): load average at start "
             f"{m['loadavg_start']}, at end {m['loadavg_end']}.  ",
             f"CPU flags: `{m.get('cpu_flags')}`.  ",
             f"CPU exp loops (native): {m.get('cpu_simd_path', 'n/a')}; fused columns: "
             f"{', '.join(label for _, label in cols)}.  ",
             f"Memory: {m['memory_method']}. Roofline: {m['roofline']}. Timing: {m['timing']}. "
             "fused / roofline: a / b / c = wall time against the roofline subprocess / wall "
             "time against the roofline pass timed right after each fused run (paired) / "
             "process CPU time (both threads) against the paired pass's CPU time, which "
             "descheduling by other sessions does not inflate.",
             "", "| k | N | V | dtype | naive (time/peak extra) | roofline | "
             + " | ".join(f"{label} | {label} / roofline" for _, label in cols) + " | speedup |",
             "|---" * (7 + 2 * len(cols)) + "|"]
    for r in result["cases"]:
        sp = r.get("speedup_vs_naive")
        lines.append(f"| {r['k']} | {r['N']} | {r['V']} | {r['dtype']} | {_cell(r, 'naive')} | "
                     f"{_cell(r, 'roofline')} | "
                     + " | ".join(f"{_cell(r, key)} | {_ratio(r, key)}" for key, _ in cols)
                     + f" | {sp and f'{sp:.1f}x' or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
