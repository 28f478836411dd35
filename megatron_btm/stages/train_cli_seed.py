"""Train the seed LM on a mixture of domains (the first stage of BTM).

Runs under torchrun or srun for multi-process TP/PP/DP (reads RANK/WORLD_SIZE or SLURM_PROCID/
SLURM_NTASKS), or as a single process.
"""
from megatron_btm.stages import train_args

HELP = "train the seed LM on a mixture of domains"


def add_arguments(parser):
    train_args.add_common(parser)
    parser.add_argument("--domains", required=True, help="comma-separated domains of the mixture")
    parser.add_argument("--weights", default=None,
                        help="comma-separated mixture weights in the order of --domains "
                        "(default: balanced)")


def run(args):
    from megatron_btm.stages.train import train_seed
    cfg = train_args.load_config(args)
    domains = train_args.split_list(args.domains, "--domains")
    weights = None
    if args.weights:
        values = [float(x) for x in train_args.split_list(args.weights, "--weights")]
        if len(values) != len(domains):
            raise ValueError(f"--weights: {len(values)} values for {len(domains)} domains")
        weights = dict(zip(domains, values))
    result = train_seed(cfg, data_dir=args.data, domains=domains, output_dir=args.output,
                        weights=weights, resume=args.resume)
    print(f"seed: {result.step} steps, {result.tokens} tokens, checkpoint {result.checkpoint}")
