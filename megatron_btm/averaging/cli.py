"""Average expert checkpoints into one model: θ = Σ_j a_j θ_j (weights-only torch_dist output).

Two ways to name the experts:
  btm average --checkpoint A,B,C [--weights 0.2,0.3,0.5] --output OUT
  btm average --forest ROOT --method {uniform,argmax,posterior,topk} [--prior prior.json] [--k K] --output OUT

Weights that do not sum to 1 are normalised with a warning; negative ones are refused. With a
forest, experts whose weight is 0 (argmax, topk) are left out entirely. The summary (tensors,
bytes, timings) is printed as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_btm import cli_args

HELP = "average expert checkpoints (uniform, weighted, argmax / posterior / top-k of a prior)"
FOREST_METHODS = ("uniform", "argmax", "posterior", "topk")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    cli_args.add_checkpoint(parser, multiple=True, group=src, metavar="DIR",
                            help="checkpoint folders (or run folders with checkpoints/latest)")
    cli_args.add_forest(parser, group=src, help="average the experts of this forest")
    parser.add_argument("--weights", metavar="W,W",
                        type=cli_args.comma_list("--weights", float, unique=False, what="a number"),
                        help="comma-separated weights, one per --checkpoint (default: uniform)")
    parser.add_argument("--method", choices=FOREST_METHODS, default="uniform",
                        help="with --forest: how to weight the experts")
    parser.add_argument("--prior", metavar="JSON", help="prior of the target domain (btm prior); "
                        "needed by argmax, posterior and topk")
    parser.add_argument("--k", type=int, help="number of experts kept by --method topk")
    cli_args.add_output(parser, metavar="DIR", help="output checkpoint folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    cli_args.add_no_progress(parser)


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    return resolve_checkpoint(p)


def _from_checkpoints(args) -> tuple[list[Path], list[float], dict]:
    if args.prior or args.k is not None or args.method != "uniform":
        raise ValueError("--method/--prior/--k apply to --forest; with --checkpoint give --weights")
    dirs = [_checkpoint_dir(p) for p in args.checkpoints]
    if args.weights is None:
        return dirs, [1.0 / len(dirs)] * len(dirs), {"method": "uniform"}
    if len(args.weights) != len(dirs):
        raise ValueError(f"--weights: {len(args.weights)} values for {len(dirs)} --checkpoint folders")
    return dirs, list(args.weights), {"method": "weighted"}


def _from_forest(args) -> tuple[list[Path], list[float], dict]:
    from megatron_btm.averaging.methods import get_method
    from megatron_btm.forest import Forest
    if args.weights is not None:
        raise ValueError("--weights applies to --checkpoint; with --forest use --method/--prior")
    forest = Forest.open(args.forest)
    ids = [rec.id for rec in forest.require_experts()]
    prior = None
    if args.method != "uniform":
        if not args.prior:
            raise ValueError(f"--method {args.method} needs --prior (a prior JSON from `btm prior`)")
        from megatron_btm.routing.prior import load_prior
        prior, _, _ = load_prior(args.prior, expert_ids=ids)
    weights = get_method(args.method)(len(ids), prior=prior, k=args.k)
    used = [(i, w) for i, w in zip(ids, weights) if w > 0]
    dirs = [forest.checkpoint_path(i) for i, _ in used]  # verified against forest.json checksums
    extra = {"method": args.method, "forest": str(Path(args.forest).resolve()),
             "expert_ids": [i for i, _ in used]}
    if args.prior:
        extra["prior"] = str(Path(args.prior).resolve())
    if args.k is not None:
        extra["k"] = args.k
    return dirs, [w for _, w in used], extra


def run(args: argparse.Namespace) -> int:
    from megatron_btm.averaging.readahead import start_readahead
    dirs, weights, extra = _from_forest(args) if args.forest else _from_checkpoints(args)
    # disk reads of the experts start now and overlap the torch import below
    start_readahead([d for d, w in zip(dirs, weights) if w != 0])
    from megatron_btm.averaging.apply import average_checkpoints
    summary = average_checkpoints(dirs, weights, args.output, meta_extra=extra,
                                  progress=not args.no_progress, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
