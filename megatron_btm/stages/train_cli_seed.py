"""Train the seed LM on a mixture of domains (the first stage of BTM).

Runs under torchrun or srun for multi-process TP/PP/DP (reads RANK/WORLD_SIZE or SLURM_PROCID/
SLURM_NTASKS), or as a single process.
"""
from megatron_btm import cli_args
from megatron_btm.stages import train_args

HELP = "train the seed LM on a mixture of domains"


def add_arguments(parser):
    train_args.add_common(parser)
    cli_args.add_domains(parser, help="comma-separated domains of the mixture")
    train_args.add_weights(parser)


def run(args):
    from megatron_btm.stages.train import train_seed
    cfg = train_args.load_config(args)
    weights = train_args.weights_of(args)
    result = train_seed(cfg, data_dir=args.data, domains=args.domains, output_dir=args.output,
                        weights=weights, resume=args.resume,
                        allow_change=args.allow_change)
    print(f"seed: {result.step} steps, {result.tokens} tokens, checkpoint {result.checkpoint}")
