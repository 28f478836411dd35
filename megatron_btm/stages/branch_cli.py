"""Initialise new experts from the forest (BTM's branch stage).

For each domain, writes OUTPUT/<domain>/: a weights-only checkpoint (the π-weighted average of
the top-k experts for that domain, or a copy of the seed in the first cycle) and branch.json
(parents, weights, prior, the forest snapshot). Run it once per cycle, before training.
"""
from megatron_btm import cli_args

HELP = "initialise new experts from the forest (posterior-weighted top-k average or seed copy)"


def add_policy_arguments(parser):
    """How new experts are initialised (shared by `btm branch` and `btm cycle`)."""
    from megatron_btm.stages.branch import POLICIES
    parser.add_argument("--policy", choices=POLICIES, default="topk",
                        help="topk: π-weighted average of the k most likely experts; all: of every "
                        "expert; uniform: plain average; seed: copy of the seed")
    parser.add_argument("--k", type=int, default=2, help="experts averaged by --policy topk")
    parser.add_argument("--split", default="valid", help="split used to estimate the prior π")
    parser.add_argument("--num-sequences", type=int, default=100, help="sequences used to estimate π")
    parser.add_argument("--alpha", type=float, default=0.3, help="EMA rate of the prior estimate")
    from megatron_btm.routing.cluster_cli import add_cluster_arguments
    from megatron_btm.stages.branch import WEIGHTS
    parser.add_argument("--weights", choices=WEIGHTS, default="prior",
                        help="π of --policy topk/all: prior = the cached prior estimated by the "
                        "experts; cluster = the new domain's documents' distances to --clusters")
    add_cluster_arguments(parser, help="with --weights cluster: the clusters")


def policy_config(args):
    from megatron_btm.stages.branch import BranchConfig
    return BranchConfig(policy=args.policy, k=args.k, split=args.split,
                        num_sequences=args.num_sequences, alpha=args.alpha, weights=args.weights,
                        clusters=args.clusters, cluster_temperature=args.cluster_temperature)


def add_arguments(parser):
    cli_args.add_no_progress(parser)
    cli_args.add_forest(parser)
    cli_args.add_data(parser, help="preprocessed data folder (held-out text of the new domains)")
    cli_args.add_domains(parser, help="comma-separated new domains")
    cli_args.add_output(parser, metavar="DIR", help="folder for the branch checkpoints "
                        "(<output>/<domain>/, each one `btm train-expert --checkpoint`)")
    add_policy_arguments(parser)
    parser.add_argument("--cycle", type=int, default=None, help="cycle number (default: next)")


def run(args):
    from megatron_btm.stages.branch import branch
    cfg = policy_config(args)
    records = branch(args.forest, domains=args.domains,
                     data_dir=args.data, output_dir=args.output, cfg=cfg, cycle=args.cycle,
                     progress=not args.no_progress)
    for domain, rec in records.items():
        parents = ", ".join(f"{p['id']}:{p['weight']:.3f}" for p in rec["parents"])
        print(f"branch {domain} (cycle {rec['cycle']}, {rec['policy']}): {parents}")
