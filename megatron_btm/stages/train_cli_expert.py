"""Train one expert LM on its domain, starting from a branch (BTM's train stage).

`--checkpoint` is a folder written by `btm branch` (weights + branch.json with the parents), or
any checkpoint. With `--resume auto` a requeued job continues from its latest checkpoint.
"""
from megatron_btm import cli_args
from megatron_btm.stages import train_args

HELP = "train one expert on its domain from a branch checkpoint"


def add_arguments(parser):
    train_args.add_common(parser)
    cli_args.add_domain(parser, help="the expert's domain")
    cli_args.add_checkpoint(parser, help="branch folder (from `btm branch`) or checkpoint to start "
                            "from (omit: random init)")


def run(args):
    from megatron_btm.forest.names import check_domain
    from megatron_btm.stages.train import train_expert
    check_domain(args.domain)
    cfg = train_args.load_config(args)
    result = train_expert(cfg, data_dir=args.data, domain=args.domain, output_dir=args.output,
                          init_from=args.checkpoint, resume=args.resume,
                          allow_change=args.allow_change)
    print(f"expert {args.domain}: {result.step} steps, {result.tokens} tokens, "
          f"checkpoint {result.checkpoint}")
