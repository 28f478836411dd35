"""The SLURM executor: submit the graph's jobs, report node states, resubmit what is not done.

What is done is what the graph's done-records say (written by the nodes themselves); SLURM
only adds what is still queued or running, and why a job that never reported ended. The
submission record (`<run_dir>/slurm/state.json`, atomic JSON) lists every submission:
{"jobs": {key: [{"job_id": "14", "tasks": {node_id: index}}]}}; the latest submission that
holds a node counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import slurm
from megatron_btm.pipeline.plan import RunPlan
from megatron_btm.pipeline.sbatch import Job, array_spec, build_jobs, write_scripts
from megatron_btm.utils.io import atomic_write_json, read_json


def state_path(plan: RunPlan) -> Path:
    return Path(plan.run_dir) / "slurm" / "state.json"


def scripts_dir(plan: RunPlan) -> Path:
    return Path(plan.run_dir) / "slurm" / "scripts"


def _load(plan: RunPlan) -> dict:
    path = state_path(plan)
    return read_json(path) if path.is_file() else {"jobs": {}}


@dataclass(kw_only=True)
class NodeState:
    node: str
    job: str                 # the job key that runs it
    job_id: str | None       # "14" or "14_2"; None if never submitted
    state: str               # done | failed | cancelled | RUNNING/PENDING/... | not-submitted | lost
    error: str = ""

    @property
    def active(self) -> bool:
        return self.state in slurm.ACTIVE

    @property
    def done(self) -> bool:
        return self.state == "done"


def node_states(plan: RunPlan, graph: G.Graph) -> list[NodeState]:
    st, cache = _load(plan), {}
    out = []
    for job in build_jobs(plan, graph):
        subs = st["jobs"].get(job.key, [])
        for i, node in enumerate(job.nodes):
            latest = next((s for s in reversed(subs) if node in s["tasks"] or not job.array), None)
            jid = None if latest is None else (
                f"{latest['job_id']}_{latest['tasks'][node]}" if job.array else latest["job_id"])
            ns = NodeState(node=node, job=job.key, job_id=jid, state="not-submitted")
            fail = graph.failure(node)
            if graph.done(node):
                ns.state = "done"
            elif jid is not None:
                base = jid.split("_")[0]
                if base not in cache:
                    cache[base] = slurm.job_states(base)
                t = cache[base].get(jid)
                if t is None:
                    ns.state = "failed" if fail else "lost"   # purged, never reported done
                elif t.state in slurm.ACTIVE:
                    ns.state = t.state
                elif t.state == "CANCELLED" and t.reason.startswith("Dependency"):
                    ns.state = "cancelled"   # something upstream failed
                else:
                    ns.state = "failed"
                    ns.error = f"job {jid} {t.state} exit={t.exit_code}"
            if fail and not ns.done and not ns.active:   # a queued rerun: the old error is stale
                ns.error = fail.get("error", ns.error)
            out.append(ns)
    return out


def _submit(plan: RunPlan, state: dict, job: Job, after: list[str], nodes: list[str]) -> str:
    """Submit one job (or the array tasks of `nodes`); record it at once; return its id."""
    script = str(scripts_dir(plan) / job.script)
    if job.array is None:
        jid = slurm.sbatch(script, after=after)
        state["jobs"].setdefault(job.key, []).append({"job_id": jid, "tasks": {}})
    else:
        idx = [job.nodes.index(n) for n in nodes]
        jid = slurm.sbatch(script, after=after, array=array_spec(idx, plan.cluster.max_concurrent))
        state["jobs"].setdefault(job.key, []).append({"job_id": jid, "tasks": dict(zip(nodes, idx))})
    atomic_write_json(state_path(plan), state)
    return jid


def submit(plan: RunPlan, graph: G.Graph) -> list[str]:
    """Submit every job that still has a node to do, chained by afterok; a job whose nodes
    are all queued or running is kept as the dependency instead. Returns what was submitted
    (job keys; `key:node` for array tasks). Used for the first run and for every resume."""
    states = {s.node: s for s in node_states(plan, graph)}
    state = _load(plan)
    jobs = build_jobs(plan, graph)
    write_scripts(jobs, scripts_dir(plan))
    (Path(plan.run_dir) / "logs").mkdir(parents=True, exist_ok=True)   # SLURM opens --output first
    ids: dict[str, list[str]] = {}
    redone: list[str] = []
    new_ids: list[str] = []
    replaced: set[str] = set()   # job keys with a new submission in this call
    try:
        for job in jobs:
            after = [i for a in job.after for i in ids[a]]
            upstream_new = bool(set(job.after) & replaced)
            live = [states[n] for n in job.nodes if states[n].active]
            todo = [n for n in job.nodes if not states[n].done and not states[n].active]
            if upstream_new and live:   # they wait on replaced jobs: replace them too
                slurm.scancel(sorted({s.job_id for s in live}))
                todo, live = [n for n in job.nodes if not states[n].done], []
            ids[job.key] = sorted({s.job_id for s in live})
            if todo:
                if job.array is None:
                    todo = list(job.nodes)   # one job runs all its nodes (done ones are no-ops)
                jid = _submit(plan, state, job, after, todo)
                new_ids.append(jid)
                replaced.add(job.key)
                ids[job.key].append(jid)
                redone += [job.key] if job.array is None else [f"{job.key}:{n}" for n in todo]
    except Exception:
        slurm.scancel(new_ids)   # no half-submitted chain
        raise
    return redone


def format_status(plan: RunPlan, states: list[NodeState]) -> str:
    rows = [f"BTM plan {plan.name!r} ({plan.run_dir})"]
    for s in states:
        rows.append(f"  {s.node:<28} {s.job_id or '-':<10} {s.state}" + (f"  {s.error}" if s.error else ""))
    failed = [s for s in states if s.state in ("failed", "lost")]
    if failed:
        rows.append("failed nodes: " + ", ".join(f"{s.node} ({s.error or s.state})" for s in failed))
    if all(s.done for s in states):
        rows.append("run complete")
    elif failed or any(s.state in ("cancelled", "not-submitted") for s in states) and not any(
            s.active for s in states):
        rows.append("run incomplete: `btm resume PLAN` reruns only what is not done")
    else:
        rows.append("run in progress")
    return "\n".join(rows) + "\n"
