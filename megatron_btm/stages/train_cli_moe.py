"""Train a mixture-of-experts checkpoint on a mixture of domains (issue 16: BTX / FlexOlmo).

`--checkpoint` is a MoE checkpoint (`btm merge-moe`, or a run trained with
model.num_moe_experts); its meta.json model_config is the architecture (a --config YAML and
--set may change the routing knobs, not the architecture). `--mode router-only` trains only
the routers (`*.mlp.router.*`), every other tensor stays the checkpoint's; `--mode full`
trains everything. Megatron's router adds its load-balancing loss (coefficient
--aux-loss-coeff; logged as moe/load_balancing_loss). The run folder is resumable
(--resume auto) and its checkpoints load with `btm eval --moe`. At --set parallel.tp=N > 1
sequence parallelism is turned on (Megatron trains MoE at TP > 1 only with it); the checkpoints
load at any TP.
"""
from megatron_btm import cli_args
from megatron_btm.stages import train_args

HELP = "train a mixture-of-experts checkpoint: router only (FlexOlmo) or full (BTX)"


def add_arguments(parser):
    train_args.add_common(parser)
    cli_args.add_checkpoint(parser, required=True, help="MoE checkpoint (or run folder) to start from")
    cli_args.add_domains(parser, help="comma-separated domains of the mixture (in --data)")
    train_args.add_weights(parser)
    parser.add_argument("--mode", required=True, metavar="MODE",
                        help="router-only: train the routers only (every other tensor frozen); "
                        "full: train every parameter")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (= --set steps=N)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (= --set optim.lr=X)")
    parser.add_argument("--topk", type=int, default=None,
                        help="active experts per token (default: the checkpoint's moe_router_topk)")
    parser.add_argument("--aux-loss-coeff", dest="aux_loss_coeff", type=float, default=None,
                        help="coefficient of the load-balancing loss (default: the checkpoint's)")
    parser.add_argument("--load-balancing", dest="load_balancing", default=None,
                        metavar="TYPE", help="aux_loss, seq_aux_loss or none (default: the "
                        "checkpoint's moe_router_load_balancing_type)")


FLAG_KEYS = {"steps": "steps", "lr": "optim.lr", "topk": "model.moe_router_topk",
             "aux_loss_coeff": "model.moe_aux_loss_coeff",
             "load_balancing": "model.moe_router_load_balancing_type"}


def run(args):
    from megatron_btm.stages import train_moe as stage
    stage.check_mode(args.mode)
    _, parent = stage.read_parent(args.checkpoint)
    overrides = list(args.overrides) + [f"{key}={getattr(args, flag)}" for flag, key in
                                        FLAG_KEYS.items() if getattr(args, flag) is not None]
    if args.no_progress:
        overrides.append("progress=false")
    cfg = stage.moe_train_config(parent, args.config, overrides)
    weights = train_args.weights_of(args)
    result = stage.train_moe(cfg, checkpoint=args.checkpoint, data_dir=args.data,
                             domains=args.domains, output_dir=args.output, mode=args.mode,
                             weights=weights, resume=args.resume, allow_change=args.allow_change)
    print(f"moe {args.mode}: {result.step} steps, {result.tokens} tokens, "
          f"checkpoint {result.checkpoint}")
