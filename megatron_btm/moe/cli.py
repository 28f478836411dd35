"""Merge a forest's experts into one mixture-of-experts checkpoint (Branch-Train-MiX).

    btm merge-moe --forest F --output CKPT [--experts a,b] [--shared uniform|posterior:PRIOR]
                  [--router hidden|hidden-centered|lda|random] [--topk 2] [--seed N] [--data DATA_DIR]

Each expert's MLP (weights and biases) becomes one MoE expert; every other parameter is averaged
(uniformly, or with a `btm prior` of this forest over the chosen experts), streamed like
`btm average`. Router rows: `hidden` = per layer, the L2-normalised mean router input over
--num-sequences blocks of each expert's domain (--data, --split), computed with the merged model
under a uniform router; `hidden-centered` = the same with the mean over domains subtracted
first; `lda` = linear discriminant rows S^-1 (mu_d - mu) (S: the domains' mean covariance,
shrunk) and the matching bias where the router has one (docs/MOE.md); `random` = Megatron's
normal init. The output is a weights-only torch_dist
checkpoint that `btm eval --moe` loads at any TP; meta.json records the lineage.
"""
from __future__ import annotations

import argparse
import json

from megatron_btm import cli_args

from megatron_btm.moe.merge import ROUTERS  # light: merge.py imports torch lazily

HELP = "merge a forest's experts into one mixture-of-experts checkpoint (FFNs -> experts, rest averaged)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_forest(parser)
    cli_args.add_output(parser, metavar="DIR", help="output checkpoint folder (absent or empty)")
    parser.add_argument("--experts", metavar="A,B", type=cli_args.comma_list("--experts"),
                        help="expert ids, in MoE order (default: every expert of the forest)")
    parser.add_argument("--shared", default="uniform", metavar="uniform|posterior:PRIOR",
                        help="weights of the averaged (non-MLP) parameters")
    parser.add_argument("--router", default="hidden", choices=ROUTERS,
                        help="router initialisation (measured: docs/MOE.md; lda routes best)")
    parser.add_argument("--topk", type=int, default=2, help="experts active per token (recorded "
                        "as moe_router_topk; `btm eval --moe-topk` can change it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --router random")
    cli_args.add_data(parser, required=False, help="preprocessed data folder (needed by every --router but random)")
    parser.add_argument("--split", default="valid", help="split sampled by the data-driven routers")
    parser.add_argument("--num-sequences", type=int, default=16,
                        help="blocks of seq_length tokens per domain for the data-driven routers")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward (data-driven routers)")
    cli_args.add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_btm.moe.merge import MergeMoeConfig, merge_moe
    cfg = MergeMoeConfig(forest=args.forest, output=args.output, experts=args.experts,
                         shared=args.shared, router=args.router, topk=args.topk, seed=args.seed,
                         data=args.data, split=args.split, num_sequences=args.num_sequences,
                         batch_size=args.batch_size, progress=not args.no_progress)
    print(json.dumps(merge_moe(cfg), indent=2))
    return 0
