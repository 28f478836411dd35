"""sbatch scripts for a plan, and the dependency graph that chains them.

seed ─afterok─> cycle1-branch ─> cycle1-train (array, one task per domain, `%` limit)
     ─afterok (whole array)─> cycle1-merge ─> cycle2-branch ─> ...

Every job carries --kill-on-invalid-dep=yes (a failed expert cancels the merge instead of
leaving it pending forever, so the forest never gets a partial cycle), --requeue with
--open-mode=append (a requeued expert resumes from its latest checkpoint and keeps its log).
Scripts read top to bottom; every plan value is quoted (commands.render_bash); the only
absolute paths in them are the plan's own. Output is deterministic (golden-file tested).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megatron_btm.launch import commands as C
from megatron_btm.launch.plan import BTMPlan, CycleConfig
from megatron_btm.utils.io import atomic_write_text


@dataclass(kw_only=True)
class Job:
    key: str                    # seed | cycle<c>-branch | cycle<c>-train | cycle<c>-merge
    script: str                 # file name under the scripts folder
    text: str
    after: list[str] = field(default_factory=list)   # afterok on these keys
    array: str | None = None    # e.g. "0-15%16"
    cycle: int | None = None
    domains: list[str] = field(default_factory=list)


def array_spec(indices: list[int], limit: int) -> str:
    """SLURM --array for task indices: contiguous runs compressed ("0-3,7%16")."""
    runs, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            runs.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(runs) + f"%{limit}"


def _header(plan: BTMPlan, name: str, what: str, *, nodes: int, ntasks_per_node: int,
            gpus_per_node: int, time: str, array: str | None = None) -> list[str]:
    cl = plan.cluster
    log = f"{plan.run_dir}/logs/%x-%A_%a.out" if array else f"{plan.run_dir}/logs/%x-%j.out"
    lines = ["#!/bin/bash", f"# BTM plan {plan.name!r}: {what}",
             f"#SBATCH --job-name=btm-{plan.name}-{name}"]
    if cl.partition:
        lines.append(f"#SBATCH --partition={cl.partition}")
    if cl.account:
        lines.append(f"#SBATCH --account={cl.account}")
    lines += [f"#SBATCH --nodes={nodes}", f"#SBATCH --ntasks-per-node={ntasks_per_node}",
              f"#SBATCH --cpus-per-task={cl.cpus_per_task}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    lines.append(f"#SBATCH --time={time}")
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += [f"#SBATCH --output={log}", "#SBATCH --open-mode=append", "#SBATCH --requeue",
              "#SBATCH --kill-on-invalid-dep=yes"]
    lines += [f"#SBATCH {x}" for x in cl.extra_sbatch]
    lines += ["", "set -eo pipefail"]
    if cl.env_setup:
        lines += ["", "# Environment (plan: cluster.env_setup, verbatim)", *cl.env_setup]
    lines += ["set -u", "",
              "# Plan values, quoted: no value can become shell syntax",
              f"RUN_DIR={shlex.quote(plan.run_dir)}",
              f"DATA_DIR={shlex.quote(plan.data_dir)}",
              f"TRAIN_CONFIG={shlex.quote(plan.train_config)}",
              f"BTM=({' '.join(shlex.quote(w) for w in shlex.split(cl.btm_command))})",
              'mkdir -p "${RUN_DIR}"/logs "${RUN_DIR}"/launch/done']
    return lines


def _rendezvous(plan: BTMPlan) -> list[str]:
    addr = ('"$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"'
            if plan.cluster.master_addr == "auto" else shlex.quote(plan.cluster.master_addr))
    return ["", "# torch.distributed rendezvous: ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID;",
            "# the port is derived from the job id so concurrent jobs on one host do not collide",
            f"export MASTER_ADDR={addr}",
            "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"]


def _srun(plan: BTMPlan, ntasks: int, per_node: int) -> str:
    cl = plan.cluster
    words = ["srun", f"--ntasks={ntasks}", f"--ntasks-per-node={per_node}"]
    if cl.container_image:
        words.append(f"--container-image={cl.container_image}")
    if cl.container_mounts:
        words.append(f"--container-mounts={cl.container_mounts}")
    return " ".join(words)


def _btm(argv) -> str:
    return '"${BTM[@]}" ' + C.render_bash(argv)


def _domains_array(domains: list[str]) -> str:
    return "DOMAINS=(" + " ".join(shlex.quote(d) for d in domains) + ")"


def seed_job(plan: BTMPlan) -> Job:
    cl = plan.cluster
    n = cl.seed_nodes * cl.seed_tasks_per_node
    lines = _header(plan, "seed", "seed LM on the domain mixture, then the forest is created from it",
                    nodes=cl.seed_nodes, ntasks_per_node=cl.seed_tasks_per_node,
                    gpus_per_node=cl.gpus_per_expert, time=cl.time_seed)
    lines += _rendezvous(plan)
    lines += ["", "# Train the seed (resumes from its latest complete checkpoint after a requeue)",
              f"{_srun(plan, n, cl.seed_tasks_per_node)} {_btm(C.train_seed(plan))}",
              "", "# Create the forest from the finished seed run",
              _btm(C.merge_seed()),
              'touch "${RUN_DIR}"/launch/done/seed', ""]
    return Job(key="seed", script="00-seed.sbatch", text="\n".join(lines))


def cycle_jobs(plan: BTMPlan, cycle: CycleConfig, after: str) -> list[Job]:
    cl, c = plan.cluster, cycle.index
    pre = f"{c:02d}-cycle{c}"
    n = len(cycle.domains)
    lines = _header(plan, f"c{c}-branch", f"cycle {c}, branch: initialise the {n} new experts "
                    "from the forest as it is now", nodes=1, ntasks_per_node=1, gpus_per_node=1,
                    time=cl.time_stage)
    lines += ["", f"# Branch: one weights-only checkpoint per domain (policy {plan.branch.policy}, k={plan.branch.k})",
              _btm(C.branch(plan, cycle)), f'touch "${{RUN_DIR}}"/launch/done/cycle{c}-branch', ""]
    branch = Job(key=f"cycle{c}-branch", script=f"{pre}-branch.sbatch", text="\n".join(lines),
                 after=[after], cycle=c, domains=list(cycle.domains))

    spec = array_spec(list(range(n)), cl.max_concurrent)
    lines = _header(plan, f"c{c}-train", f"cycle {c}, train: one expert per array task",
                    nodes=1, ntasks_per_node=cl.expert_ntasks, gpus_per_node=cl.gpus_per_expert,
                    time=cl.time_expert, array=spec)
    lines += ["", "# This task's domain (array index -> domain, in plan order)",
              _domains_array(cycle.domains),
              'DOMAIN=${DOMAINS[${SLURM_ARRAY_TASK_ID}]:-}',
              '[ -n "${DOMAIN}" ] || { echo "no domain for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 1; }']
    lines += _rendezvous(plan)
    lines += ["", "# Train the expert from its branch (--resume auto: a requeued task continues",
              "# from the run's latest complete checkpoint)",
              f"{_srun(plan, cl.expert_ntasks, cl.expert_ntasks)} {_btm(C.train_expert(plan, cycle))}",
              f'touch "${{RUN_DIR}}"/launch/done/cycle{c}-expert-"${{DOMAIN}}"', ""]
    train = Job(key=f"cycle{c}-train", script=f"{pre}-train.sbatch", text="\n".join(lines),
                after=[branch.key], array=spec, cycle=c, domains=list(cycle.domains))

    lines = _header(plan, f"c{c}-merge", f"cycle {c}, merge: register every expert of the cycle "
                    "(runs only when the whole array succeeded)", nodes=1, ntasks_per_node=1,
                    gpus_per_node=0, time=cl.time_stage)
    lines += ["", "# Register every expert of the cycle (idempotent: a resumed cycle may merge again)",
              _btm(C.merge_cycle(cycle)), f'touch "${{RUN_DIR}}"/launch/done/cycle{c}-merge', ""]
    merge = Job(key=f"cycle{c}-merge", script=f"{pre}-merge.sbatch", text="\n".join(lines),
                after=[train.key], cycle=c, domains=list(cycle.domains))
    return [branch, train, merge]


def eval_job(plan: BTMPlan, after: str) -> Job:
    n = len(plan.evaluation.domains)
    lines = _header(plan, "eval", f"evaluate the finished forest on {n} domain(s)", nodes=1,
                    ntasks_per_node=1, gpus_per_node=1, time=plan.cluster.time_stage)
    lines += ["", f"# Perplexity table: each expert, the ensemble, top-k ({plan.evaluation.split} split)",
              'mkdir -p "${RUN_DIR}"/eval', _btm(C.evaluate(plan)),
              'touch "${RUN_DIR}"/launch/done/eval', ""]
    return Job(key="eval", script=f"{len(plan.cycles) + 1:02d}-eval.sbatch", text="\n".join(lines),
               after=[after])


def build_jobs(plan: BTMPlan) -> list[Job]:
    jobs = [seed_job(plan)]
    for cycle in plan.cycles:
        jobs += cycle_jobs(plan, cycle, after=jobs[-1].key)
    if plan.evaluation.domains:
        jobs.append(eval_job(plan, after=jobs[-1].key))
    return jobs


def graph_text(plan: BTMPlan, jobs: list[Job]) -> str:
    """The dependency graph, one job a line, in submission order."""
    out = [f"BTM plan {plan.name!r}: {len(jobs)} jobs, {len(plan.all_domains())} experts in "
           f"{len(plan.cycles)} cycles (afterok chain; every job --kill-on-invalid-dep=yes, --requeue)"]
    for j in jobs:
        dep = " ".join(f"afterok:{a}" for a in j.after) or "-"
        extra = f"  array={j.array} ({len(j.domains)} experts)" if j.array else ""
        out.append(f"  {j.key:<16} {j.script:<26} after={dep}{extra}")
    return "\n".join(out) + "\n"


def write_scripts(jobs: list[Job], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    paths = []
    for j in jobs:
        atomic_write_text(folder / j.script, j.text)
        (folder / j.script).chmod(0o755)
        paths.append(folder / j.script)
    return paths


def dry_run_text(plan: BTMPlan, jobs: list[Job]) -> str:
    """Graph + every script, as `btm launch slurm --dry-run` prints it (the golden file)."""
    parts = [graph_text(plan, jobs)]
    for j in jobs:
        parts.append(f"\n===== {j.script} =====\n{j.text}")
    return "".join(parts)
