"""Two executors of the stage graph on this machine: in-process and local subprocesses.

Both run the same nodes through `nodes.run_node` (the rules live there and in graph.py); they
differ only in where a node runs. A failed expert does not stop its siblings (experts are
independent), but nothing that needs it runs: its cycle is not merged and the next cycle does
not start. Resume is running the graph again: done nodes are no-ops.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline.nodes import NodeFailed, run_node
from megatron_btm.pipeline.plan import RunPlan
from megatron_btm.utils.proc import die_with_parent


def _finish(graph: G.Graph, failed: list[str]) -> None:
    if failed:
        blocked = sorted(set().union(*(graph.downstream(f) for f in failed)) - set(failed))
        raise NodeFailed(f"node(s) {', '.join(failed)} failed; not run because of it: "
                         f"{', '.join(blocked) or 'nothing'}. `btm status` shows the errors; "
                         f"`btm resume PLAN` reruns only what is not done")


def run_inprocess(plan: RunPlan, graph: G.Graph, *, log: Callable[[str], None] = print) -> None:
    """Every node in this process, in topological order."""
    failed: list[str] = []
    for node in graph.nodes:
        if graph.done(node.id) or not graph.ready(node.id):
            continue   # done, or blocked by a failure upstream
        log(f"[{node.id}] running in-process")
        try:
            run_node(plan, graph, node.id, log=log)
        except NodeFailed as e:
            log(f"[{node.id}] FAILED: {e}")
            failed.append(node.id)
    _finish(graph, failed)


# Nodes that train: they run on `executor.ntasks` ranks (their config's parallel.tp / pp split
# them; what remains is data parallel), as their SLURM jobs run on `cluster.ntasks_per_expert`
# (the seed: seed_nodes x seed_ntasks_per_node). Every other node runs on one rank.
TRAINING_KINDS = (G.SEED, G.TRAIN, G.TRAIN_MOE)


def node_command(plan: RunPlan, nodes: list[G.Node]) -> list[str]:
    ntasks = plan.executor.ntasks if nodes[0].kind in TRAINING_KINDS else 1
    prog = [sys.executable, "-m", "megatron_btm.cli"]
    if ntasks > 1:   # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; the CLI reads them
        prog = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ntasks}", "-m", "megatron_btm.cli"]
    return prog + ["node", plan.run_dir, *(n.id for n in nodes)]


def _groups(ready: list[G.Node]) -> list[list[G.Node]]:
    """One process per node, except a cycle's ready branch nodes: one process loads and scores
    the forest's experts once for all of them."""
    out: list[list[G.Node]] = []
    for n in ready:
        if out and n.kind == G.BRANCH and out[-1][0].kind == G.BRANCH and out[-1][0].cycle == n.cycle:
            out[-1].append(n)
        else:
            out.append([n])
    return out


def run_local(plan: RunPlan, graph: G.Graph, *, parallel: int = 1,
              log: Callable[[str], None] = print) -> None:
    """Every node as a subprocess (`btm node RUN_DIR ID`), up to `parallel` at a time."""
    logs = Path(plan.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    running: dict[str, tuple[subprocess.Popen, Path, float, list[str]]] = {}
    busy: set[str] = set()
    failed: list[str] = []
    while True:
        blocked = set(failed).union(*(graph.downstream(f) for f in failed)) if failed else set()
        ready = [n for n in graph.nodes if n.id not in busy and n.id not in blocked
                 and not graph.done(n.id) and graph.ready(n.id)]
        for group in _groups(ready)[:max(0, parallel - len(running))]:
            cmd = node_command(plan, group)
            name = group[0].id if len(group) == 1 else f"cycle{group[0].cycle}-branch"
            log_file = logs / f"{name}.log"
            with open(log_file, "ab") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=die_with_parent)
            ids = [n.id for n in group]
            running[name] = (proc, log_file, time.time(), ids)
            busy.update(ids)
            log(f"[{name}] started: {shlex.join(cmd)} (log {log_file})")
        if not running:
            break
        time.sleep(0.1)
        for name, (proc, log_file, started, ids) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            busy.difference_update(ids)
            for node_id in ids:
                if graph.done(node_id):   # done is the done-record, whatever the exit code
                    continue
                if graph.failure(node_id) is None:   # killed before it could say why
                    graph.mark_failed(graph[node_id], f"exit code {proc.returncode}", log=str(log_file))
                failed.append(node_id)
            if all(graph.done(i) for i in ids):
                log(f"[{name}] done in {time.time() - started:.0f} s")
            else:
                log(f"[{name}] FAILED (exit {proc.returncode}); log {log_file}")
    _finish(graph, failed)
