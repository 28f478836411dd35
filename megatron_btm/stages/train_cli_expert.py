"""Train one expert LM on its domain, starting from a branch (BTM's train stage).

`--init-from` is a folder written by `btm branch` (weights + branch.json with the parents), or
any checkpoint. With `--resume auto` a requeued job continues from its latest checkpoint.
"""
from megatron_btm.stages import train_args

HELP = "train one expert on its domain from a branch checkpoint"


def add_arguments(parser):
    train_args.add_common(parser)
    parser.add_argument("--domain", required=True, help="the expert's domain")
    parser.add_argument("--init-from", default=None,
                        help="branch folder or checkpoint to start from (omit: random init)")


def run(args):
    from megatron_btm.forest.names import check_domain
    from megatron_btm.stages.train import train_expert
    check_domain(args.domain)
    cfg = train_args.load_config(args)
    result = train_expert(cfg, data_dir=args.data, domain=args.domain, output_dir=args.output,
                          init_from=args.init_from, resume=args.resume)
    print(f"expert {args.domain}: {result.step} steps, {result.tokens} tokens, "
          f"checkpoint {result.checkpoint}")
