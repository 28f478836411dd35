"""Run one BTM cycle over an existing forest on this machine: branch, train, merge.

A one-cycle run plan on the local executor (`btm run`'s graph and rules): each expert trains
in its own process (no synchronisation between them), `--parallel` at a time; the merge runs
only when every expert succeeded; rerunning with the same --output resumes. For whole runs and
clusters, write a plan and use `btm run PLAN --executor slurm`.
"""
from megatron_btm import cli_args
from megatron_btm.stages import branch_cli

HELP = "run one local BTM cycle (branch → train experts in parallel → merge)"


def add_arguments(parser):
    cli_args.add_forest(parser, help="forest folder (created by `btm merge --seed`)")
    cli_args.add_data(parser)
    cli_args.add_domains(parser, help="comma-separated new domains, e.g. bible,legal")
    cli_args.add_output(parser, metavar="DIR",
                        help="run folder for the cycle's plan, branches, expert runs and logs")
    cli_args.add_config(parser, help="training YAML for the experts (a `train:` section is used "
                        "when present)", set_help="override an expert training config value")
    branch_cli.add_policy_arguments(parser)
    parser.add_argument("--parallel", type=int, default=1, help="experts trained at the same time")


def run(args):
    from megatron_btm.stages.cycle import run_cycle
    merged = run_cycle(args.forest, domains=args.domains,
                       data_dir=args.data, work_dir=args.output, config=args.config,
                       overrides=args.overrides, branch_cfg=branch_cli.policy_config(args),
                       parallel=args.parallel)
    print(f"merged {len(merged)} experts: {', '.join(merged)}")
