"""Arguments shared by `btm train-seed`, `train-expert` and `train-moe` (built from cli_args)."""
from __future__ import annotations

import argparse

from megatron_btm import cli_args
from megatron_btm.cli_args import load_train_config as load_config  # noqa: F401 (train-seed, train-expert)


def add_common(parser: argparse.ArgumentParser) -> None:
    cli_args.add_config(parser)
    cli_args.add_data(parser)
    cli_args.add_output(parser, metavar="DIR", help="run folder (checkpoints, logs, stage.json)")
    parser.add_argument("--resume", choices=("auto", "none"), default="auto",
                        help="auto: continue from the run folder's latest complete checkpoint if "
                        "any; none: start fresh (refuses a folder with checkpoints)")
    parser.add_argument("--allow-change", dest="allow_change", default=[], metavar="KEY,KEY",
                        type=cli_args.comma_list("--allow-change"),
                        help="resuming: config keys (e.g. steps, optim.lr) or 'blend' that may "
                        "differ from the run's run.json (any other change is refused)")
    cli_args.add_no_progress(parser)



def add_weights(parser: argparse.ArgumentParser) -> None:
    """`--weights W,W`: mixture weights in the order of --domains (train-seed, train-moe)."""
    parser.add_argument("--weights", default=None, metavar="W,W",
                        type=cli_args.comma_list("--weights", float, unique=False, what="a number"),
                        help="comma-separated mixture weights in the order of --domains "
                        "(default: balanced)")


def weights_of(args: argparse.Namespace) -> dict[str, float] | None:
    """{domain: weight} from --weights and --domains (None: balanced)."""
    if args.weights is None:
        return None
    if len(args.weights) != len(args.domains):
        raise ValueError(f"--weights: {len(args.weights)} values for {len(args.domains)} "
                         f"--domains")
    return dict(zip(args.domains, args.weights))
