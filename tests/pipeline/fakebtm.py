"""A stand-in `btm` for SLURM executor tests: `btm node RUN_DIR ID ...` records each
node it is asked to run, sleeps, can fail on demand, and writes the node's done-record (the
real graph.Graph.mark_done) as the real runner does after a node's outputs.

Tests write it into a bin/ folder put first on PATH by the plan's env_setup, so the real
generated sbatch scripts run under the real scheduler without training anything.
Each node appends one JSON line to $FAKE_BTM_DIR/calls.jsonl:
{argv, node_id, kind, domain, start, end, job, task, node, cvd, procid, ntasks, master_addr,
master_port, restart, barrier_ok}. With $FAKE_BTM_BARRIER=N each train node waits until N of
them have started. A train node fails (exit 3, failed-record written) when its domain is listed
in $FAKE_BTM_DIR/fail_domains (one a line). $FAKE_BTM_SLEEP seconds of "work" (default 0).
"""
import json
import os
import sys
import time
from pathlib import Path

TEMPLATE = """#!{python}
import runpy, sys
sys.argv[0] = "btm"
runpy.run_path({script!r}, run_name="__main__")
"""


def install(bin_dir: Path) -> Path:
    """Write an executable `btm` in bin_dir that runs this file."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "btm"
    exe.write_text(TEMPLATE.format(python=sys.executable, script=str(Path(__file__).resolve())))
    exe.chmod(0o755)
    return exe


def read_calls(fake_dir: Path) -> list[dict]:
    f = Path(fake_dir) / "calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def merged(calls: list[dict]) -> list[int]:
    """Cycles of the merge nodes that ran, in order."""
    return [c["cycle"] for c in calls if c["kind"] == "merge"]


def trained(calls: list[dict]) -> list[str]:
    return [c["domain"] for c in calls if c["kind"] == "train"]


def _parse(node_id: str) -> tuple[str, int, str | None]:
    """(kind, cycle, domain) of a node id: seed, seed-merge, eval, cycle<c>-<kind>[-<domain>]."""
    if not node_id.startswith("cycle"):
        return node_id, 0, None
    head, kind, *rest = node_id.split("-", 2)
    return kind, int(head[5:]), rest[0] if rest else None


def run_one(d: Path, argv: list[str], node_id: str) -> bool:
    from megatron_btm.pipeline import graph as G
    kind, cycle, domain = _parse(node_id)
    graph = G.Graph(run_dir=Path(argv[1]))
    node = G.Node(id=node_id, kind=kind, cycle=cycle, domain=domain)
    if graph.done(node_id):
        return True
    start = time.time()
    barrier_ok = None
    if kind in ("train", "seed"):   # visible while running: tests wait for it (e.g. to requeue)
        tag = f"{kind}-{os.environ.get('SLURM_JOB_ID')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}-{os.getpid()}"
        (d / f"started-{tag}").write_text(json.dumps(argv))
    if kind == "train" and os.environ.get("FAKE_BTM_BARRIER"):
        # Concurrency proof that does not depend on speed: wait until N experts are running at
        # once (only possible if they really are); give up after 60 s and record it.
        n, deadline = int(os.environ["FAKE_BTM_BARRIER"]), time.time() + 60
        while len(list(d.glob("started-train-*"))) < n and time.time() < deadline:
            time.sleep(0.05)
        barrier_ok = len(list(d.glob("started-train-*"))) >= n
    time.sleep(float(os.environ.get("FAKE_BTM_SLEEP", "0")) if kind in ("train", "seed") else 0)
    fail = (d / "fail_domains").read_text().split("\n") if (d / "fail_domains").exists() else []
    failed = kind == "train" and domain in fail
    e = os.environ.get
    rec = {"argv": argv, "node_id": node_id, "kind": kind, "cycle": cycle, "domain": domain,
           "start": start, "end": time.time(), "job": e("SLURM_JOB_ID"),
           "task": e("SLURM_ARRAY_TASK_ID"), "node": e("SLURMD_NODENAME"),
           "cvd": e("CUDA_VISIBLE_DEVICES"), "procid": e("SLURM_PROCID"), "ntasks": e("SLURM_NTASKS"),
           "master_addr": e("MASTER_ADDR"), "master_port": e("MASTER_PORT"),
           "restart": e("SLURM_RESTART_COUNT"), "failed": failed, "barrier_ok": barrier_ok}
    with open(d / "calls.jsonl", "a") as f:   # one short line per append: atomic enough here
        f.write(json.dumps(rec) + "\n")
    if failed:
        graph.mark_failed(node, f"node {node_id}: fake failure")
    else:
        graph.mark_done(node)
    return not failed


def main() -> int:
    d = Path(os.environ["FAKE_BTM_DIR"])
    argv = sys.argv[1:]
    assert argv[0] == "node", argv
    ids = argv[2:]
    for node_id in ids:
        if not run_one(d, argv, node_id):
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
