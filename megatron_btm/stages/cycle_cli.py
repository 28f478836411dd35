"""Run one BTM cycle on this machine: branch, train the new experts, merge them.

The experts are trained by separate `btm train-expert` processes (no synchronisation between
them), `--parallel` at a time. For clusters, use `btm launch slurm`.
"""
from megatron_btm.stages import branch_cli, train_args

HELP = "run one local BTM cycle (branch → train experts in parallel → merge)"


def add_arguments(parser):
    parser.add_argument("--forest", required=True, help="forest folder (created by `btm merge --seed`)")
    parser.add_argument("--data", required=True, help="preprocessed data folder")
    parser.add_argument("--domains", required=True, help="comma-separated new domains")
    parser.add_argument("--work-dir", required=True, help="folder for branches, expert runs and logs")
    parser.add_argument("--config", default=None, help="training YAML for the experts")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an expert training config value")
    branch_cli.add_policy_arguments(parser)
    parser.add_argument("--parallel", type=int, default=1, help="experts trained at the same time")


def run(args):
    from megatron_btm.stages.cycle import run_cycle
    merged = run_cycle(args.forest, domains=train_args.split_list(args.domains, "--domains"),
                       data_dir=args.data, work_dir=args.work_dir, config=args.config,
                       overrides=args.overrides, branch_cfg=branch_cli.policy_config(args),
                       parallel=args.parallel)
    print(f"merged {len(merged)} experts: {', '.join(merged)}")
