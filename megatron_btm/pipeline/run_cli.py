"""Run a BTM plan: seed → per cycle (branch → train → merge) → eval, as one stage graph.

The executor is the plan's (`executor.kind`) unless --executor says otherwise: inprocess
(this process), local (one subprocess per node, --parallel at a time) or slurm (sbatch job
arrays chained by afterok, --kill-on-invalid-dep=yes, --requeue). Running a plan again on the
same run_dir is a resume: done nodes are skipped, failed ones rerun, training continues from
its latest checkpoint. A changed plan on an existing run_dir is refused.
"""
HELP = "run a BTM plan's stage graph (in-process, local subprocesses or SLURM)"


def add_arguments(parser):
    from megatron_btm.pipeline.plan import EXECUTORS
    parser.add_argument("plan", help="run plan YAML (see examples/btm-slurm-mini.yaml)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where the nodes run (default: the plan's executor.kind)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="local executor: nodes run at the same time (default: the plan's)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the plan, print the graph (slurm: the scripts); run nothing")
    parser.add_argument("--no-check", action="store_true",
                        help="with --dry-run: skip the training-config and data checks (render a "
                        "plan meant for another machine)")


def run(args, resume: bool = False):
    """`resume`: btm resume (an existing run_dir is required)."""
    from megatron_btm.pipeline.plan import load_plan
    from megatron_btm.pipeline.run import execute
    if args.parallel is not None and args.parallel < 1:
        raise ValueError(f"--parallel {args.parallel}: must be >= 1")
    if args.no_check and not args.dry_run:
        raise ValueError("--no-check: only with --dry-run (a real run always checks its plan)")
    execute(load_plan(args.plan), executor=args.executor, parallel=args.parallel,
            dry_run=args.dry_run, check=not args.no_check, resume=resume)
    return 0
