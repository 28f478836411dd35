"""Running a plan's stage graph on one of the three executors; the state of a run.

    btm run PLAN [--executor inprocess|local|slurm] [--parallel N] [--dry-run]
    btm status PLAN        btm resume PLAN

`run` and `resume` are the same operation — run every node that is not done — except that
`resume` requires the run to exist. The executor comes from the plan's `executor` section
unless given. Before anything runs or is submitted, every stage's training config is composed
and the data is checked (also with --dry-run).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

from megatron_btm.errors import RunFailedError
from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline.nodes import freeze, plan_file
from megatron_btm.pipeline.plan import RunPlan, check_training
from megatron_btm.utils.io import HELD, TAKEN, flock_nb


def execute(plan: RunPlan, *, executor: str | None = None, parallel: int | None = None,
            dry_run: bool = False, check: bool = True, resume: bool = False,
            log: Callable[[str], None] = print) -> list[str]:
    """Run (or submit) every node that is not done. Returns the ids of the nodes it ran (for
    SLURM: the jobs it submitted). Raises NodeFailed when a node failed."""
    kind = executor or plan.executor.kind
    parallel = parallel or plan.executor.parallel
    graph = G.build_graph(plan)
    if resume and not plan_file(plan.run_dir).is_file():
        raise FileNotFoundError(f"{plan.source or 'plan'}: nothing to resume in {plan.run_dir} "
                                "(start the run with `btm run PLAN`)")
    if check:
        check_training(plan)
    if dry_run:
        return _dry_run(plan, graph, kind, log)
    with driver_lock(plan.run_dir):
        return _execute(plan, graph, kind, parallel, log)


DRIVER_LOCK = "driver.lock"


@contextlib.contextmanager
def driver_lock(run_dir: str | Path) -> Iterator[None]:
    """One `btm run`/`resume` of a run_dir at a time: a second driver would run (or submit)
    the same nodes again beside the first. An flock, so a killed driver holds nothing; on a
    filesystem without flock the run goes on unguarded."""
    path = Path(run_dir) / G.GRAPH_DIR / DRIVER_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    state = flock_nb(fd)
    if state != TAKEN:
        os.close(fd)
        fd = None
        if state == HELD:
            raise RunFailedError(f"{run_dir}: another `btm run`/`btm resume` of this run is still "
                                 f"running (it holds {path}); wait for it or stop it first")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _execute(plan: RunPlan, graph: G.Graph, kind: str, parallel: int, log) -> list[str]:
    freeze(plan)
    todo = [n.id for n in graph.pending()]
    if kind == "slurm":
        from megatron_btm.pipeline import slurm_executor
        submitted = slurm_executor.submit(plan, graph)
        log("submitted: " + (", ".join(submitted) if submitted else "nothing (every node is done "
                             "or still queued)"))
        log(f"submission record: {slurm_executor.state_path(plan)}; logs in {Path(plan.run_dir) / 'logs'}")
        return submitted
    from megatron_btm.pipeline import executors
    if kind == "inprocess":
        from megatron_btm.megatron import parallel as par
        par.init_distributed()
        executors.run_inprocess(plan, graph, log=log)
    else:
        executors.run_local(plan, graph, parallel=parallel, log=log)
    log(f"run complete: forest {Path(plan.run_dir) / G.forest_root(plan)}; logs in {Path(plan.run_dir) / 'logs'}")
    return todo


def _dry_run(plan: RunPlan, graph: G.Graph, kind: str, log) -> list[str]:
    if kind == "slurm":
        from megatron_btm.pipeline import sbatch
        log(sbatch.dry_run_text(plan, sbatch.build_jobs(plan, graph)).rstrip("\n"))
    else:
        log(graph_text(graph))
    log(f"dry run ({kind}): nothing ran, nothing was written")
    return []


def graph_text(graph: G.Graph) -> str:
    rows = [f"{len(graph.nodes)} nodes"]
    for n in graph.nodes:
        rows.append(f"  {n.id:<28} {graph.state(n.id):<8} after {', '.join(n.inputs) or '-'}")
    return "\n".join(rows)


def status(plan: RunPlan) -> tuple[str, list[dict]]:
    """A table of every node's state (from the done/failed records, plus SLURM's queue for a
    submitted run) and the same as dicts."""
    from dataclasses import asdict
    graph = G.build_graph(plan)
    from megatron_btm.pipeline import slurm_executor
    if slurm_executor.state_path(plan).is_file():
        states = slurm_executor.node_states(plan, graph)
        return slurm_executor.format_status(plan, states), [asdict(s) for s in states]
    rows = [{"node": n.id, "state": graph.state(n.id),
             "error": (graph.failure(n.id) or {}).get("error", "") if not graph.done(n.id) else ""}
            for n in graph.nodes]
    lines = [f"BTM plan {plan.name!r} ({plan.run_dir})"]
    lines += [f"  {r['node']:<28} {r['state']:<8} {r['error']}".rstrip() for r in rows]
    failed = [r for r in rows if r["state"] == "failed"]
    if failed:
        lines.append("failed nodes: " + ", ".join(f"{r['node']} ({r['error']})" for r in failed))
    lines.append("run complete" if all(r["state"] == "done" for r in rows) else
                 "run incomplete: `btm resume PLAN` reruns only what is not done")
    return "\n".join(lines) + "\n", rows
