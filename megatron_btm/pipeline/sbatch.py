"""The SLURM executor's jobs: the stage graph's nodes grouped into sbatch scripts.

seed ─afterok─> cycle1-branch ─> cycle1-train (array, one task per domain, `%` limit)
     ─afterok (whole array)─> cycle1-merge ─> cycle2-branch ─> ...

Each job runs graph nodes with `btm node RUN_DIR ID...` (the same runner, rules and
done-records as the other executors; the run's frozen plan lives in RUN_DIR).
Every job carries --kill-on-invalid-dep=yes (a failed expert cancels the merge instead of
leaving it pending forever, so the forest never gets a partial cycle), --requeue with
--open-mode=append (a requeued expert resumes from its latest checkpoint and keeps its log).
Scripts read top to bottom; every plan value is quoted; the only
absolute paths in them are the plan's own. Output is deterministic (golden-file tested).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline.plan import CycleConfig, RunPlan
from megatron_btm.utils.io import atomic_write_text


@dataclass(kw_only=True)
class Job:
    key: str                    # seed | cycle<c>-branch | cycle<c>-train | cycle<c>-merge
    script: str                 # file name under the scripts folder
    text: str
    after: list[str] = field(default_factory=list)   # afterok on these keys
    array: str | None = None    # e.g. "0-15%16"
    cycle: int | None = None
    domains: list[str] = field(default_factory=list)   # array jobs: task i trains domains[i]
    nodes: list[str] = field(default_factory=list)     # the graph nodes this job runs


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


def _header(plan: RunPlan, name: str, what: str, *, nodes: int, ntasks_per_node: int,
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
              f"BTM=({' '.join(shlex.quote(w) for w in shlex.split(cl.btm_command))})",
              'mkdir -p "${RUN_DIR}"/logs',
              "# one connection per device: Megatron overlaps TP communication with compute",
              'export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"']
    return lines


def _rendezvous(plan: RunPlan) -> list[str]:
    addr = ('"$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"'
            if plan.cluster.master_addr == "auto" else shlex.quote(plan.cluster.master_addr))
    return ["", "# torch.distributed rendezvous: ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID;",
            "# the port is derived from the job id so concurrent jobs on one host do not collide",
            f"export MASTER_ADDR={addr}",
            "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"]


def _srun(plan: RunPlan, ntasks: int, per_node: int) -> str:
    cl = plan.cluster
    words = ["srun", f"--ntasks={ntasks}", f"--ntasks-per-node={per_node}"]
    if cl.container_image:
        words.append(f"--container-image={cl.container_image}")
    if cl.container_mounts:
        words.append(f"--container-mounts={cl.container_mounts}")
    return " ".join(words)


def _node(run: str, *node_ids: str) -> str:
    """`btm node RUN_DIR ID ...`: every job runs nodes of the run's frozen plan."""
    words = ['"${BTM[@]}"', "node", '"${RUN_DIR}"']
    for n in node_ids:
        words.append(n if n.startswith('"') else shlex.quote(n))
    return " ".join(words)


def _domains_array(domains: list[str]) -> str:
    return "DOMAINS=(" + " ".join(shlex.quote(d) for d in domains) + ")"


def build_jobs(plan: RunPlan, graph: G.Graph | None = None) -> list[Job]:
    """The graph's nodes grouped into jobs: seed (train + forest), per cycle one branch job,
    one array of expert jobs (a task per train node) and a merge job, then eval."""
    graph = graph or G.build_graph(plan)
    jobs: list[Job] = []
    seed_nodes = [n.id for n in graph.nodes if n.kind in (G.SEED, G.SEED_MERGE)]
    if seed_nodes:
        jobs.append(seed_job(plan, trained=G.SEED in seed_nodes, nodes=seed_nodes))
    for cycle in plan.cycles:
        jobs += cycle_jobs(plan, cycle, after=jobs[-1].key if jobs else None)
    leaves = [jobs[-1].key]
    if plan.moe is not None:   # merge-moe after the last cycle, train-moe jobs after it
        from megatron_btm.pipeline.moe_nodes import slurm_jobs
        moe = slurm_jobs(plan, after=jobs[-1].key)
        jobs += moe
        leaves = [j.key for j in moe[1:]] or [moe[0].key]
    if plan.evaluation.domains:
        jobs.append(eval_job(plan, after=leaves))
    return jobs


def seed_job(plan: RunPlan, *, trained: bool, nodes: list[str]) -> Job:
    cl = plan.cluster
    n = cl.seed_nodes * cl.seed_tasks_per_node
    lines = _header(plan, "seed", "seed LM on the domain mixture, then the forest is created from it"
                    if trained else "the forest is created from the seed checkpoint",
                    nodes=cl.seed_nodes if trained else 1, ntasks_per_node=cl.seed_tasks_per_node if trained else 1,
                    gpus_per_node=cl.gpus_per_expert, time=cl.time_seed)
    if trained:
        lines += _rendezvous(plan)
        lines += ["", "# Train the seed (resumes from its latest complete checkpoint after a requeue)",
                  f"{_srun(plan, n, cl.seed_tasks_per_node)} {_node(plan.run_dir, G.SEED)}"]
    lines += ["", "# Create the forest from the seed", _node(plan.run_dir, G.SEED_MERGE), ""]
    return Job(key="seed", script="00-seed.sbatch", text="\n".join(lines), nodes=nodes)


def cycle_jobs(plan: RunPlan, cycle: CycleConfig, after: str | None) -> list[Job]:
    cl, c = plan.cluster, cycle.index
    pre = f"{c:02d}-cycle{c}"
    n = len(cycle.domains)
    branches = [G.node_id(G.BRANCH, c, d) for d in cycle.domains]
    lines = _header(plan, f"c{c}-branch", f"cycle {c}, branch: initialise the {n} new experts "
                    f"from the forest as it was before cycle {c}", nodes=1, ntasks_per_node=1,
                    gpus_per_node=1, time=cl.time_stage)
    lines += ["", f"# Branch: one weights-only checkpoint per domain (policy {plan.branch.policy}, k={plan.branch.k})",
              _node(plan.run_dir, *branches), ""]
    branch = Job(key=f"cycle{c}-branch", script=f"{pre}-branch.sbatch", text="\n".join(lines),
                 after=[after] if after else [], cycle=c, nodes=branches)

    spec = array_spec(list(range(n)), cl.max_concurrent)
    train_node = f'"{G.node_id(G.TRAIN, c, "")}${{DOMAIN}}"'   # cycle<c>-train-<domain>
    lines = _header(plan, f"c{c}-train", f"cycle {c}, train: one expert per array task",
                    nodes=1, ntasks_per_node=cl.expert_ntasks, gpus_per_node=cl.gpus_per_expert,
                    time=cl.time_expert, array=spec)
    lines += ["", "# This task's domain (array index -> domain, in plan order)",
              _domains_array(cycle.domains),
              'DOMAIN=${DOMAINS[${SLURM_ARRAY_TASK_ID}]:-}',
              '[ -n "${DOMAIN}" ] || { echo "no domain for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 1; }']
    lines += _rendezvous(plan)
    lines += ["", "# Train the expert from its branch (a requeued task continues from the run's",
              "# latest complete checkpoint)",
              f"{_srun(plan, cl.expert_ntasks, cl.expert_ntasks)} {_node(plan.run_dir, train_node)}", ""]
    train = Job(key=f"cycle{c}-train", script=f"{pre}-train.sbatch", text="\n".join(lines),
                after=[branch.key], array=spec, cycle=c, domains=list(cycle.domains),
                nodes=[G.node_id(G.TRAIN, c, d) for d in cycle.domains])

    merge_id = G.node_id(G.MERGE, c)
    lines = _header(plan, f"c{c}-merge", f"cycle {c}, merge: register every expert of the cycle "
                    "(runs only when every expert succeeded)", nodes=1, ntasks_per_node=1,
                    gpus_per_node=0, time=cl.time_stage)
    lines += ["", "# Register every expert of the cycle (idempotent: a resumed cycle may merge again)",
              _node(plan.run_dir, merge_id), ""]
    merge = Job(key=f"cycle{c}-merge", script=f"{pre}-merge.sbatch", text="\n".join(lines),
                after=[train.key], cycle=c, nodes=[merge_id])
    return [branch, train, merge]


def eval_job(plan: RunPlan, after: list[str]) -> Job:
    n = len(plan.evaluation.domains)
    lines = _header(plan, "eval", f"evaluate the finished forest on {n} domain(s)", nodes=1,
                    ntasks_per_node=1, gpus_per_node=1, time=plan.cluster.time_stage)
    lines += ["", f"# Perplexity table: each expert, the ensemble, top-k ({plan.evaluation.split} split)",
              _node(plan.run_dir, G.EVAL), ""]
    return Job(key="eval", script=f"{len(plan.cycles) + 1:02d}-eval.sbatch", text="\n".join(lines),
               after=list(after), nodes=[G.EVAL])


def graph_text(plan: RunPlan, jobs: list[Job]) -> str:
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


def dry_run_text(plan: RunPlan, jobs: list[Job]) -> str:
    """Graph + every script, as `btm run PLAN --executor slurm --dry-run` prints it (the golden file)."""
    parts = [graph_text(plan, jobs)]
    for j in jobs:
        parts.append(f"\n===== {j.script} =====\n{j.text}")
    return "".join(parts)
