"""Submit a plan to SLURM, report its state, resume what failed.

The launch state file (`<run_dir>/launch/state.json`, atomic JSON) records every submission:
{"plan": name, "scripts_dir": ..., "stages": {key: [{"job_id": "14", "tasks": {domain: index}}]}}.
The latest submission that contains a domain (or, for single jobs, the latest) is the one
that counts. States come from scontrol; when slurmctld has purged a job, the done-markers the
scripts touch (`<run_dir>/launch/done/`) say whether it finished.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_btm.launch import slurm
from megatron_btm.launch.plan import BTMPlan, check_training
from megatron_btm.launch.sbatch import Job, array_spec, build_jobs, write_scripts
from megatron_btm.utils.io import atomic_write_json, read_json


def state_path(plan: BTMPlan) -> Path:
    return Path(plan.run_dir) / "launch" / "state.json"


def _marker(plan: BTMPlan, name: str) -> Path:
    return Path(plan.run_dir) / "launch" / "done" / name


def _save(plan: BTMPlan, state: dict) -> None:
    atomic_write_json(state_path(plan), state)


@dataclass(kw_only=True)
class Unit:
    """One schedulable thing: a single job, or one expert (array task)."""
    stage: str
    domain: str | None
    job_id: str | None      # "14" or "14_2"; None if never submitted
    state: str              # JobState, DONE (marker; job purged), UNKNOWN, NOT_SUBMITTED
    exit_code: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("COMPLETED", "DONE")

    @property
    def active(self) -> bool:
        return self.state in slurm.ACTIVE

    @property
    def failed(self) -> bool:
        return not (self.ok or self.active)

    @property
    def cancelled_by_dependency(self) -> bool:
        """Cancelled by SLURM because something upstream failed (kill_invalid_depend)."""
        return self.state == "CANCELLED" and self.reason.startswith("Dependency")


@dataclass(kw_only=True)
class RunStatus:
    plan: str
    units: list[Unit] = field(default_factory=list)

    def failed_experts(self) -> list[Unit]:
        """Experts whose own job failed (not those cancelled because something upstream failed)."""
        return [u for u in self.units if u.domain is not None and u.failed and not u.cancelled_by_dependency]

    def failed_units(self) -> list[Unit]:
        return [u for u in self.units if u.failed and not u.cancelled_by_dependency]

    def complete(self) -> bool:
        return all(u.ok for u in self.units)

    def format(self) -> str:
        rows = [f"BTM plan {self.plan!r}"]
        for u in self.units:
            name = u.stage if u.domain is None else f"  {u.stage} {u.domain!r}"
            extra = "".join([f" exit={u.exit_code}" if u.exit_code and u.failed else "",
                             f" reason={u.reason}" if u.reason and u.reason != "None" and not u.ok else ""])
            rows.append(f"{name:<34} {u.job_id or '-':<10} {u.state}{extra}")
        bad = self.failed_experts()
        if bad:
            rows.append("failed experts: " + ", ".join(
                f"{u.stage.split('-')[0]} {u.domain!r} (job {u.job_id}, {u.state})" for u in bad))
        other = [u for u in self.failed_units() if u.domain is None]
        if other:
            rows.append("failed jobs: " + ", ".join(f"{u.stage} (job {u.job_id}, {u.state})" for u in other))
        rows.append("run complete" if self.complete() else
                    "run incomplete: `btm launch resume PLAN` resubmits what failed" if any(
                        u.failed for u in self.units) else "run in progress")
        return "\n".join(rows) + "\n"


def _marker_name(stage: str, domain: str | None) -> str:
    if domain is not None:   # cycle3-train + domain -> cycle3-expert-<domain>
        return stage.replace("-train", "-expert-") + domain
    return stage   # seed, cycle<c>-branch, cycle<c>-merge


def _load_state(plan: BTMPlan) -> dict:
    if not state_path(plan).exists():
        raise FileNotFoundError(f"{state_path(plan)}: no launch state; plan {plan.name!r} was not "
                                "submitted from this run_dir (`btm launch slurm PLAN` submits it)")
    return read_json(state_path(plan))


def status(plan: BTMPlan) -> RunStatus:
    state = _load_state(plan)
    cache: dict[str, dict[str, slurm.TaskState]] = {}

    def lookup(job: str | None, stage: str, domain: str | None) -> Unit:
        if job is None:
            return Unit(stage=stage, domain=domain, job_id=None, state="NOT_SUBMITTED")
        base = job.split("_")[0]
        if base not in cache:
            cache[base] = slurm.job_states(base)
        t = cache[base].get(job)
        if t is None:
            done = _marker(plan, _marker_name(stage, domain)).exists()
            return Unit(stage=stage, domain=domain, job_id=job, state="DONE" if done else "UNKNOWN")
        return Unit(stage=stage, domain=domain, job_id=job, state=t.state, exit_code=t.exit_code,
                    reason=t.reason)

    out = RunStatus(plan=plan.name)
    for job in build_jobs(plan):
        subs = state["stages"].get(job.key, [])
        if job.array is None:
            out.units.append(lookup(subs[-1]["job_id"] if subs else None, job.key, None))
            continue
        for d in job.domains:
            latest = next((s for s in reversed(subs) if d in s["tasks"]), None)
            jid = f"{latest['job_id']}_{latest['tasks'][d]}" if latest else None
            out.units.append(lookup(jid, job.key, d))
    return out


def _submit(plan: BTMPlan, state: dict, job: Job, after: list[str], domains: list[str] | None = None) -> list[str]:
    """Submit one job (or the array tasks of `domains`); record it; return the dependency ids."""
    script = str(Path(state["scripts_dir"]) / job.script)
    if job.array is None:
        jid = slurm.sbatch(script, after=after)
        state["stages"].setdefault(job.key, []).append({"job_id": jid, "tasks": {}})
        _save(plan, state)
        return [jid]
    domains = job.domains if domains is None else domains
    idx = [job.domains.index(d) for d in domains]
    jid = slurm.sbatch(script, after=after, array=array_spec(idx, plan.cluster.max_concurrent))
    state["stages"].setdefault(job.key, []).append({"job_id": jid, "tasks": dict(zip(domains, idx))})
    _save(plan, state)
    return [jid]


def submit(plan: BTMPlan, *, scripts_dir: str | Path | None = None) -> dict:
    """Write the scripts and submit the whole chain. Refuses if this run has live jobs."""
    if state_path(plan).exists():
        st = status(plan)
        if any(u.active for u in st.units):
            raise ValueError(f"{state_path(plan)}: this run already has jobs in the queue; "
                             "use `btm launch status` / `btm launch resume`")
    check_training(plan)
    jobs = build_jobs(plan)
    scripts_dir = Path(scripts_dir or Path(plan.run_dir) / "launch" / "scripts")
    write_scripts(jobs, scripts_dir)
    (Path(plan.run_dir) / "logs").mkdir(parents=True, exist_ok=True)   # SLURM opens --output first
    state = {"plan": plan.name, "scripts_dir": str(scripts_dir), "stages": {}}
    ids: dict[str, list[str]] = {}
    try:
        for job in jobs:
            ids[job.key] = _submit(plan, state, job, [i for a in job.after for i in ids[a]])
    except Exception:
        slurm.scancel([i for v in ids.values() for i in v])   # no half-submitted chain
        raise
    return state


def resume(plan: BTMPlan) -> list[str]:
    """Resubmit failed/cancelled stages and experts, and everything downstream of them.

    Finished work is kept; a still-running expert stays a dependency (afterok on its task);
    an old merge still pending on a failed array is cancelled and replaced. Returns the keys
    (and stage:domain for experts) resubmitted.
    """
    st = status(plan)
    state = _load_state(plan)
    write_scripts(build_jobs(plan), state["scripts_dir"])   # scripts may have been cleaned up
    (Path(plan.run_dir) / "logs").mkdir(parents=True, exist_ok=True)   # SLURM opens --output first
    units = {(u.stage, u.domain): u for u in st.units}
    redone: list[str] = []
    prev: list[str] = []          # dependency ids of the previous stage still to finish
    upstream_redone = False
    for job in build_jobs(plan):
        after = list(prev)
        if job.array is None:
            u = units[(job.key, None)]
            if u.ok and not upstream_redone:
                prev = []
            elif u.active and not upstream_redone:
                prev = [u.job_id]
            else:
                if u.active:
                    slurm.scancel([u.job_id])
                prev = _submit(plan, state, job, after)
                redone.append(job.key)
                upstream_redone = True
            continue
        experts = [units[(job.key, d)] for d in job.domains]
        rerun = [u.domain for u in experts if (u.failed or upstream_redone) and not u.ok]
        live = [u.job_id for u in experts if u.active and u.domain not in rerun]
        if upstream_redone:
            slurm.scancel([u.job_id for u in experts if u.active])
            live = []
        prev = live
        if rerun:
            prev += _submit(plan, state, job, after, rerun)
            redone += [f"{job.key}:{d}" for d in rerun]
            upstream_redone = True
    return redone
