"""`btm launch`: run a BTM plan on SLURM (slurm, status, resume) or on this machine (local).

  btm launch slurm PLAN [--dry-run]   write the sbatch scripts, submit the dependency chain
  btm launch status PLAN              job and expert states (scontrol; no sacct needed)
  btm launch resume PLAN              resubmit only what failed or was cancelled, and what waits on it
  btm launch local PLAN [--parallel N]  the same stages as subprocesses, no SLURM
"""
from __future__ import annotations

import argparse
import sys

HELP = "run a BTM plan: on SLURM (slurm/status/resume) or on this machine (local)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="launch_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("slurm", help="generate the sbatch scripts and submit the whole run")
    p.add_argument("plan", help="plan YAML (see examples/btm-slurm-mini.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="write the scripts and print the dependency graph and scripts; submit nothing")
    p.add_argument("--scripts-dir", default=None,
                   help="where to write the sbatch scripts (default: RUN_DIR/launch/scripts)")
    p = sub.add_parser("status", help="job and expert states of a submitted run")
    p.add_argument("plan")
    p.add_argument("--json", dest="json_out", default=None, help="also write the states to this JSON file")
    p = sub.add_parser("resume", help="resubmit failed/cancelled experts and the jobs that wait on them")
    p.add_argument("plan")
    p = sub.add_parser("local", help="run the plan on this machine without SLURM")
    p.add_argument("plan")
    p.add_argument("--parallel", type=int, default=1, help="experts trained at the same time")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except RuntimeError as e:   # a stage or sbatch/scontrol failed: say which, exit 1
        print(f"btm launch {args.launch_command}: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from megatron_btm.launch.plan import load_plan

    plan = load_plan(args.plan)
    cmd = args.launch_command
    if cmd == "slurm":
        from pathlib import Path

        from megatron_btm.launch import runner, sbatch
        jobs = sbatch.build_jobs(plan)
        if args.dry_run:
            folder = Path(args.scripts_dir or Path(plan.run_dir) / "launch" / "scripts")
            sbatch.write_scripts(jobs, folder)
            print(sbatch.dry_run_text(plan, jobs), end="")
            print(f"btm launch: dry run, nothing submitted; {len(jobs)} scripts in {folder}", file=sys.stderr)
            return 0
        state = runner.submit(plan, scripts_dir=args.scripts_dir)
        print(sbatch.graph_text(plan, jobs), end="")
        for key, subs in state["stages"].items():
            print(f"  submitted {key:<16} job {subs[-1]['job_id']}")
        print(f"launch state: {runner.state_path(plan)}")
        return 0
    if cmd == "status":
        from dataclasses import asdict

        from megatron_btm.launch import runner
        from megatron_btm.utils.io import atomic_write_json
        st = runner.status(plan)
        print(st.format(), end="")
        if args.json_out:
            atomic_write_json(args.json_out, {"plan": st.plan, "units": [asdict(u) for u in st.units],
                                              "failed_experts": [asdict(u) for u in st.failed_experts()]})
        return 0
    if cmd == "resume":
        from megatron_btm.launch import runner
        redone = runner.resume(plan)
        print("resubmitted: " + (", ".join(redone) if redone else "nothing (no failed or cancelled job)"))
        return 0
    if cmd == "local":
        from megatron_btm.launch import local
        if args.parallel < 1:
            raise ValueError(f"--parallel {args.parallel}: must be >= 1")
        return local.run_local(plan, parallel=args.parallel, dry_run=args.dry_run)
    raise ValueError(f"unknown launch subcommand {cmd!r}; valid: slurm, status, resume, local")
