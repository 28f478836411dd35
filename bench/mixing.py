"""Benchmark of the fused ensemble-logit mixing op (megatron_btm.ops.mix_nll) against the naive
PyTorch expression and a read-bandwidth roofline, on CPU (default) or one CUDA device.

For every (k experts, N tokens, V vocab, dtype) case and every method, a fresh subprocess
allocates the logits, then times the method; its peak *extra* memory is measured as
  CPU:  ru_maxrss after the runs − ru_maxrss right after the logits were allocated and filled
        in place (no temporary, so that baseline equals the resident size of the inputs);
  CUDA: torch.cuda.max_memory_allocated() − memory_allocated() after allocation.
Methods:
  naive     log_softmax per expert (fp32), gather the targets, logsumexp over experts
  fused     ops.mix_nll (nll and expert log-likelihoods; forward only)
  roofline  CPU: one amax pass over the same bytes (bf16 logits viewed as fp32, since torch's
            bf16 amax is compute-bound); CUDA: a device-to-device copy of the logits.
A case whose naive expression would not fit in --mem-budget-gb is reported as skipped.

    taskset -c 0,1 python bench/mixing.py            # full grid, 2 threads
    python bench/mixing.py --quick                   # small grid (smoke)
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

    if args.method == "naive":
        fn = lambda: _naive(logits, lw, targets)  # noqa: E731
    elif args.method == "fused":
        fn = lambda: ops.mix_nll(logits, lw, targets)  # noqa: E731
    elif cuda:
        dst = torch.empty_like(logits)
        fn = lambda: dst.copy_(logits)  # noqa: E731
    else:
        flat = logits.view(-1)  # one pass over all bytes; bf16 pairs read as fp32 words
        flat = flat.view(torch.float32) if dt == torch.bfloat16 else flat
        fn = lambda: flat.amax()  # noqa: E731

    times = []
    for i in range(args.warmup + args.reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        del out
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    res = {"time_s": min(times), "times_s": times, "peak_extra_mb": max(peak, 0) / 2**20,
           "backend": ops.backend(dev)}
    if args.method == "fused":  # sanity: agrees with the fp64 reference on a few tokens
        nll, _ = ops.mix_nll(logits[:, :8], lw[:8], targets[:8])
        ref, _ = ops.reference.mix_nll(logits[:, :8].double(), lw[:8].double(), targets[:8])
        res["max_abs_err_first8"] = float((nll.double() - ref).abs().max())
    return res


# ---------------------------------------------------------------- driver

def run_case(method, k, n, v, dtype, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method,
           "--k", str(k), "--n", str(n), "--v", str(v), "--dtype", dtype,
           "--device", a.device, "--threads", str(a.threads),
           "--warmup", str(0 if method == "naive" else 1),
           "--reps", str(2 if method == "naive" else 3)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(a.threads))
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
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (CPU)")
    p.add_argument("--quick", action="store_true", help="small grid, for a smoke run")
    p.add_argument("--mem-budget-gb", type=float, default=14.0,
                   help="skip a method whose logits + extra memory would exceed this (GiB)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "mixing.json"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return 0

    sys.path.insert(0, ROOT)
    from megatron_btm.utils.io import atomic_write_json, atomic_write_text
    ks, ns, vs = ([2, 8], [256], [32000]) if a.quick else ([2, 8, 16], [1024, 4096],
                                                            [32000, 50257])
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg(), "device": a.device, "threads": a.threads,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "mem_budget_gb": a.mem_budget_gb,
            "memory_method": ("peak extra = ru_maxrss after the runs − ru_maxrss after the logits "
                              "were allocated and filled in place, one subprocess per (case, "
                              "method)" if a.device == "cpu" else
                              "torch.cuda.max_memory_allocated − allocated after the inputs"),
            "timing": "min over reps (naive: 2 reps, no warm-up; others: 1 warm-up + 3 reps)",
            "roofline": ("one amax pass over the same bytes (bf16 viewed as fp32)"
                         if a.device == "cpu" else "device-to-device copy of the logits")}
    try:
        import torch
        meta["torch"] = torch.__version__
        meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        import megatron_btm._mixing_cpu as ext
        meta["cpu_simd_path"] = ext.simd_path()  # avx512-intrinsics | auto-vectorised
    except ImportError:
        pass
    rows = []
    for dtype in ("fp32", "bf16"):
        for k in ks:
            for n in ns:
                for v in vs:
                    logits_b = k * n * v * _bytes_per(dtype)
                    row = {"k": k, "N": n, "V": v, "dtype": dtype, "logits_gb": logits_b / GIB}
                    for m in ("roofline", "fused", "naive"):
                        need = logits_b + (logits_b if m == "roofline" and a.device != "cpu"
                                           else _extra_estimate(m, k, n, v, dtype))
                        budget = min(a.mem_budget_gb * GIB, 0.8 * _available_bytes(a.device))
                        if need > budget:
                            row[m] = {"skipped": f"needs ~{need / GIB:.1f} GiB > budget "
                                                 f"{budget / GIB:.1f} GiB"}
                        else:
                            row[m] = run_case(m, k, n, v, dtype, a)
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
    r = row.get(m, {})
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "error"
    return f"{r['time_s']:.3f}s/{r['peak_extra_mb']:.0f}MB"


def _fmt(row) -> str:
    sp = row.get("speedup_vs_naive")
    ro = row.get("fused_over_roofline")
    return (f"k={row['k']:>2} N={row['N']:>4} V={row['V']:>5} {row['dtype']}  "
            f"naive {_cell(row, 'naive'):>18}  fused {_cell(row, 'fused'):>16}  "
            f"roofline {_cell(row, 'roofline'):>16}  "
            f"speedup {sp and f'{sp:.1f}x' or '-':>6}  fused/roofline {ro and f'{ro:.2f}' or '-'}")


def _markdown(result) -> str:
    m = result["meta"]
    lines = [f"# mixing benchmark ({m['device']}, {m['threads']} threads, {m['date']})", "",
             f"load average at start {m['loadavg_start']}, at end {m['loadavg_end']}.  ",
             f"CPU exp loops: {m.get('cpu_simd_path', 'n/a')}.  ",
             f"Memory: {m['memory_method']}. Roofline: {m['roofline']}.", "",
             "| k | N | V | dtype | naive (time/peak extra) | fused | roofline | speedup | "
             "fused/roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["cases"]:
        sp, ro = r.get("speedup_vs_naive"), r.get("fused_over_roofline")
        lines.append(f"| {r['k']} | {r['N']} | {r['V']} | {r['dtype']} | {_cell(r, 'naive')} | "
                     f"{_cell(r, 'fused')} | {_cell(r, 'roofline')} | "
                     f"{sp and f'{sp:.1f}x' or '-'} | {ro and f'{ro:.2f}' or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
