"""Updates per second: n independent experts vs one dense data-parallel run on the same n ranks.

(a) experts: n processes, each the project's trainer step (training/loop.py `_setup` +
    `_run_schedule`, Megatron DDP at DP=1) on its own random data, no communication;
(b) dense: the same n processes as one gloo group, the same step at DP=n (Megatron DDP
    all-reduces the fp32 gradient buffer each step), the same model and micro-batch per rank.
Each process gets one torch thread. Reported per rank: updates/s and tokens/s, and the ratio
experts ÷ dense, next to the cost model's prediction (megatron_btm/pipeline/cost.py) from the
measured expert step time and the link.

Links: loopback (all ranks in this network namespace), then for each --links entry the ranks in
separate network namespaces joined by veth pairs to a bridge, with `tc netem rate R delay D` on
every rank's veth; gloo is bound to the veths (GLOO_SOCKET_IFNAME, MASTER_ADDR = rank 0's veth
IP). The namespaces are made here and removed in `finally` (also on Ctrl-C). Needs root.

    python bench/updates_per_second.py                  # writes bench/results/updates_per_second.*
    python bench/updates_per_second.py --links 1gbit:0.2 --steps 6
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256, vocab_size=8192)
MICRO_BATCH = 8
NS = "btmups"        # namespace prefix
SUBNET = "10.231.77"


# ---- one rank ------------------------------------------------------------------------------
def worker(*, mode: str, rank: int, world: int, steps: int, warmup: int, shape: dict,
           micro: int) -> dict:
    """Time `steps` trainer steps on this rank (after `warmup`); dense = DP over `world` ranks."""
    import torch
    torch.set_num_threads(1)
    from megatron_btm.megatron import parallel
    from megatron_btm.training import loop
    from megatron_btm.training.config import TrainConfig
    dp = world if mode == "dense" else 1
    parallel.init_distributed(rank=rank if dp > 1 else 0, world_size=dp)
    cfg = TrainConfig.from_dict({"model": shape, "micro_batch_size": micro,
                                 "global_batch_size": micro * dp, "steps": 10 ** 6,
                                 "seed": 1234 + rank, "dtype": "fp32",
                                 "optim": {"lr": 3e-4, "warmup_steps": 0, "decay_style": "constant"},
                                 "progress": False, "tensorboard": False, "num_threads": 1})
    chunks, optimizer, scheduler, choices = loop._setup(cfg)
    g = torch.Generator().manual_seed(1000 + rank)    # each rank its own data
    s = shape["seq_length"]
    times, losses = [], []
    for i in range(warmup + steps):
        x = torch.randint(0, shape["vocab_size"], (micro, s + 1), generator=g)
        batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(micro, s),
                 "position_ids": torch.arange(s).expand(micro, -1)}
        if dp > 1:
            torch.distributed.barrier()        # steps start together: the slowest rank sets the pace
        t0 = time.perf_counter()
        for m in chunks:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(float(loop._run_schedule(chunks, [batch], cfg, forward_only=False)))
        optimizer.step()
        scheduler.step(increment=1)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for m in chunks for p in m.parameters())
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size()
                     for m in chunks for b in getattr(m, "buffers", []))
    med = statistics.median(times)
    return {"mode": mode, "rank": rank, "world": world, "step_s": times, "median_step_s": med,
            "updates_per_s": 1 / med, "tokens_per_s": micro * s / med, "params": params,
            "grad_bytes": grad_bytes, "first_loss": losses[0], "last_loss": losses[-1],
            "overlap_grad_reduce": choices.get("overlap_grad_reduce")}


# ---- n ranks, optionally in network namespaces -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def netns_up(n: int, rate: str, delay_ms: float) -> list[str]:
    """Namespaces NS-hub (a bridge) and NS-0..n-1 (one veth each to the bridge, netem on it)."""
    netns_down(n)
    _sh("ip", "netns", "add", f"{NS}-hub")
    hub = ["ip", "netns", "exec", f"{NS}-hub"]
    _sh(*hub, "ip", "link", "add", "br0", "type", "bridge")
    _sh(*hub, "ip", "link", "set", "br0", "up")
    for r in range(n):
        ns = f"{NS}-{r}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", f"{NS}v{r}", "type", "veth", "peer", "name", f"{NS}h{r}")
        _sh("ip", "link", "set", f"{NS}v{r}", "netns", ns)
        _sh("ip", "link", "set", f"{NS}h{r}", "netns", f"{NS}-hub")
        ex = ["ip", "netns", "exec", ns]
        _sh(*ex, "ip", "addr", "add", f"{SUBNET}.{r + 1}/24", "dev", f"{NS}v{r}")
        _sh(*ex, "ip", "link", "set", f"{NS}v{r}", "up")
        _sh(*ex, "ip", "link", "set", "lo", "up")
        _sh(*hub, "ip", "link", "set", f"{NS}h{r}", "master", "br0")
        _sh(*hub, "ip", "link", "set", f"{NS}h{r}", "up")
        qdisc = _limit(ex, f"{NS}v{r}", rate, delay_ms)
    return [f"{NS}-{r}" for r in range(n)], qdisc


def _limit(ex: list[str], dev: str, rate: str, delay_ms: float) -> str:
    """Every rank's egress: rate R, one-way delay D (netem); where the kernel has no sch_netem,
    htb limits the rate and no delay is added (said in the results)."""
    try:
        _sh(*ex, "tc", "qdisc", "add", "dev", dev, "root", "netem", "rate", rate,
            "delay", f"{delay_ms}ms", "limit", "100000")
        return "netem"
    except subprocess.CalledProcessError as e:
        if "unknown" not in e.stderr:
            raise
    _sh(*ex, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
    _sh(*ex, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
        "rate", rate, "ceil", rate, "quantum", "60000")
    return "htb"


def netns_down(n: int) -> None:
    for name in [f"{NS}-{r}" for r in range(n)] + [f"{NS}-hub"]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_ranks(mode: str, n: int, args, namespaces: list[str] | None = None) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="btm-ups-"))
    port = _free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(r),
                   WORLD_SIZE=str(n), MASTER_PORT=str(port),
                   MASTER_ADDR=f"{SUBNET}.1" if namespaces else "127.0.0.1")
        if namespaces:
            env["GLOO_SOCKET_IFNAME"] = f"{NS}v{r}"
        elif mode == "dense":
            env["GLOO_SOCKET_IFNAME"] = "lo"
        if mode != "dense":
            for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        cmd = [sys.executable, __file__, "--worker", mode, "--rank", str(r), "--world", str(n),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--shape", json.dumps(args.shape), "--micro", str(args.micro),
               "--worker-out", str(tmp / f"{r}.json")]
        if namespaces:
            cmd = ["ip", "netns", "exec", namespaces[r], *cmd]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        rcs = [p.wait(timeout=args.timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(rcs):
        raise RuntimeError(f"{mode} ranks exited {rcs}")
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(n)]


def summarise(ranks: list[dict]) -> dict:
    step = statistics.median(r["median_step_s"] for r in ranks)
    return {"median_step_s": step, "updates_per_s": 1 / step,
            "tokens_per_s_per_rank": ranks[0]["tokens_per_s"] * ranks[0]["median_step_s"] / step,
            "ranks": ranks}


def parse_link(spec: str) -> tuple[str, float]:
    """`1gbit:0.2` → ('1gbit', 0.2 ms)."""
    try:
        rate, delay = spec.split(":")
        return rate, float(delay)
    except ValueError:
        raise ValueError(f"--links {spec!r}: each entry is RATE:DELAY_MS (e.g. 1gbit:0.2)") from None


def _rate_bytes(rate: str) -> float:
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f / 8
    raise ValueError(f"link rate {rate!r}: use NUMBER followed by gbit, mbit or kbit")


# ---- the benchmark ---------------------------------------------------------------------------
def measure_link(label: str, args, link, namespaces=None) -> dict:
    """Experts then dense then experts again (a load change hits both); ratio + prediction."""
    from megatron_btm.pipeline import cost as C
    load0 = os.getloadavg()
    e1 = run_ranks("expert", args.n, args)
    d = run_ranks("dense", args.n, args, namespaces)
    e2 = run_ranks("expert", args.n, args)
    experts = summarise(e1 + e2)
    dense = summarise(d)
    grad_bytes = d[0]["grad_bytes"] or 4 * d[0]["params"]
    row = {"link": label, "n": args.n, "experts": experts, "dense": dense,
           "measured_ratio": experts["updates_per_s"] / dense["updates_per_s"],
           "grad_bytes": grad_bytes, "allreduce_bytes": C.allreduce_bytes(grad_bytes, args.n),
           "loadavg": {"start": list(load0), "end": list(os.getloadavg())}}
    if link is not None:
        row["interconnect"] = vars(link)
        row["predicted_ratio"] = C.updates_ratio(compute_s=experts["median_step_s"],
                                                 grad_bytes=grad_bytes, n=args.n, link=link)
    print(f"  {label}: experts {experts['updates_per_s']:.3f} upd/s, dense "
          f"{dense['updates_per_s']:.3f} upd/s, ratio {row['measured_ratio']:.2f}"
          + (f" (predicted {row['predicted_ratio']:.2f})" if link else ""), flush=True)
    return row


def render(res: dict) -> str:
    s = res["shape"]
    lines = [f"n = {res['n']} ranks, one torch thread each; model L{s['num_layers']} "
             f"h{s['hidden_size']} a{s['num_attention_heads']} s{s['seq_length']} V{s['vocab_size']} "
             f"({res['params'] / 1e6:.2f}M params, {res['grad_bytes'] / 1e6:.1f} MB fp32 gradient "
             f"buffer), micro-batch {res['micro']} per rank, {res['steps']} timed steps after "
             f"{res['warmup']} warm-up, medians.", "",
             f"Machine: {res['nproc']} CPUs ({res['cpu_model']}; AVX-512 "
             f"{'yes' if 'avx512f' in (res['cpu_flags'] or '') else 'no'}, torch capability "
             f"{res['cpu_capability']}; all flags in the JSON), shared with other sessions: the "
             "load column is the 1-min load average around each row. Expert runs are timed "
             "before and after each dense run (their medians pooled) so a load change hits both.",
             "", "Invocations: " + "; ".join(f"`{' '.join(a) or '(defaults)'}`"
                                         for a in res.get("invocations", [res.get("argv", [])])), "",
             "| link | experts upd/s per rank | dense upd/s | experts tok/s per rank "
             "| dense tok/s per rank | measured ratio | predicted ratio | 1-min load start → end |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["links"]:
        pred = f"{r['predicted_ratio']:.2f}" if "predicted_ratio" in r else "— (no link model)"
        la = r["loadavg"]
        lines.append(f"| {r['link']} | {r['experts']['updates_per_s']:.3f} | "
                     f"{r['dense']['updates_per_s']:.3f} | {r['experts']['tokens_per_s_per_rank']:.0f} | "
                     f"{r['dense']['tokens_per_s_per_rank']:.0f} | {r['measured_ratio']:.2f} | {pred} | "
                     f"{la['start'][0]:.1f} → {la['end'][0]:.1f} |")
    lines += ["", "ratio = experts' updates/s ÷ dense's (> 1: experts take more updates per second). "
              "Predicted = (t_expert + 2(n−1)/n·grad_bytes/rate + 2(n−1)·delay) / t_expert with "
              "t_expert the measured expert step (`btm plan cost --interconnect custom:...`).", "",
              f"Cost model for the paper's settings ({res['paper']['assumptions']}):", "",
              "| model | GPUs | " + " | ".join(res["paper"]["links"]) + " |",
              "|---|---|" + "---|" * len(res["paper"]["links"])]
    by = res["paper"]["rows"]
    first = by[next(iter(by))]
    for i, row in enumerate(first):
        lines.append(f"| {row['model']} | {row['gpus']} | " + " | ".join(
            f"{by[k][i]['ratio_experts_over_dense']:.2f}" for k in res["paper"]["links"]) + " |")
    return "\n".join(lines) + "\n"


NOTE = """
## How to read it

- **Links.** This kernel has neither `sch_netem` nor `sch_tbf` (`tc qdisc add ... netem` and
  `... tbf` both answer "Specified qdisc kind is unknown"), so the simulated links limit the rate
  only (htb on every rank's veth egress) and add no delay; the model is given no delay either.
  For this model the latency term would be small anyway: 2(n−1) = 2 hops × 0.05-1 ms against
  steps of 1-3 s. The dense ranks run in namespaces `btmups-0/1` whose only interfaces are `lo`
  and the veth to a bridge namespace; gloo is bound to the veth (GLOO_SOCKET_IFNAME,
  MASTER_ADDR = 10.231.77.1), so every byte of the all-reduce crosses the limited link. Expert
  runs need no network and run in the root namespace.
- **The model counts wire time only.** On 2 shared cores gloo's ring also spends CPU time on the
  reduction and on TCP, which the loopback row shows (no link limit; the model predicts 1.00).
  At 100 Mbit/s the 21 MB all-reduce alone takes ~1.7 s per step, and the measured ratio is
  above the prediction for the same reason.
- **Noise.** The machine's 2 cores were shared with other sessions (the load column); single
  steps varied several-fold within a run, so a ratio moves by about ±0.2 between runs (a ratio
  just under 1 at 10 Gbit/s is such noise, not dense being faster).
- **The loopback row is the least clean**: its first minute overlapped this session's own
  helper test (tests/pipeline/test_updates_bench.py, 2 more processes on the 2 cores), which
  slowed the dense run more than the expert runs around it. A rerun of loopback and 10 Gbit/s
  (`--links 10gbit:0.05 --replace`) was stopped at a 1-min load of 30-50 (expert steps 7 s):
  its numbers would have said less, so the table keeps the first run.
- **The paper's settings** (cost model only, not measured): with NVLink-class links the
  all-reduce is ~2 % of a step; over 100 GbE it adds ~50 %, over 10 GbE the dense run is 5-6×
  slower per update. The ratio barely depends on the model size here because both compute and
  gradient bytes scale with the parameter count (and n grows with it, but 2(n−1)/n → 2).
"""


def markdown(res: dict) -> str:
    return "# Updates per second\n\n" + render(res) + NOTE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2, help="ranks (experts, or DP size of the dense run)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro", type=int, default=MICRO_BATCH)
    ap.add_argument("--shape", type=json.loads, default=SHAPE, help="model dict as JSON")
    ap.add_argument("--links", default="10gbit:0.05,1gbit:0.2,100mbit:1",
                    help="simulated links RATE:ONE_WAY_DELAY_MS, comma list ('' = loopback only)")
    ap.add_argument("--no-loopback", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per group of ranks")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "updates_per_second.json"))
    ap.add_argument("--render", metavar="JSON", help="only re-render JSON's .md")
    ap.add_argument("--replace", action="store_true",
                    help="keep --out's other rows: rows of the links measured now replace theirs")
    ap.add_argument("--worker", choices=["expert", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from megatron_btm.utils.io import atomic_write_json, atomic_write_text
    if args.worker:
        out = worker(mode=args.worker, rank=args.rank, world=args.world, steps=args.steps,
                     warmup=args.warmup, shape=args.shape, micro=args.micro)
        atomic_write_json(args.worker_out, out)
        return 0
    if args.render:
        res = json.loads(Path(args.render).read_text())
        atomic_write_text(Path(args.render).with_suffix(".md"), markdown(res))
        return 0
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # `finally` removes the namespaces
    from bench.mixing import _cpuinfo
    from megatron_btm.pipeline import cost as C
    links = [parse_link(x) for x in args.links.split(",") if x]
    import torch
    res = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:], "n": args.n, "shape": args.shape, "micro": args.micro,
           "steps": args.steps, "warmup": args.warmup, "nproc": os.cpu_count(),
           "cpu_model": _cpuinfo("model name"), "cpu_flags": _cpuinfo("flags"),
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "links": []}
    if not args.no_loopback:
        res["links"].append(measure_link("loopback (one namespace, lo)", args, None))
    for rate, delay in links:
        try:
            ns, qdisc = netns_up(args.n, rate, delay)
            d = delay if qdisc == "netem" else 0.0   # htb adds no delay: the model gets none either
            link = C.Interconnect(name=f"{rate}:{d}ms", bandwidth_bytes_s=_rate_bytes(rate),
                                  latency_s=d / 1e3)
            label = (f"netns+veth, netem {rate} {delay} ms" if qdisc == "netem" else
                     f"netns+veth, htb {rate} (no netem in this kernel: no added delay)")
            res["links"].append(measure_link(label, args, link, ns) | {"qdisc": qdisc})
        finally:
            netns_down(args.n)
    r0 = res["links"][0]["dense"]["ranks"][0]
    res["params"], res["grad_bytes"] = r0["params"], r0["grad_bytes"] or 4 * r0["params"]
    assume = C.CommAssumptions()
    paper_links = ["nvlink", "ib-hdr", "100gbe", "10gbe"]
    res["paper"] = {"assumptions": ", ".join(f"{k}={v:g}" for k, v in vars(assume).items()),
                    "links": paper_links,
                    "rows": {k: C.paper_predictions(C.parse_interconnect(k), assume) for k in paper_links}}
    res["invocations"] = [res["argv"]]
    if args.replace and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        new = {r["link"]: r for r in res["links"]}
        res["links"] = [new.pop(r["link"], r) for r in old["links"]] + list(new.values())
        res["invocations"] = old.get("invocations", [old["argv"]]) + [res["argv"]]
    table = render(res)
    print(table)
    atomic_write_json(args.out, res)
    atomic_write_text(Path(args.out).with_suffix(".md"), markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
