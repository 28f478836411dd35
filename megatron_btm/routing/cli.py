"""Estimate the cached domain prior of a forest's experts on held-out text of a target domain.

    btm prior --forest ROOT --data DATA_DIR --domains D [--split valid] [--num-sequences 100]
              [--alpha 0.3] --output prior.json
    btm prior --forest ROOT --data DATA_DIR --domains a,b,c --output PRIORS_DIR   (DIR/<d>.json)

The prior (DEMix): run the ensemble with the updating posterior on the first N blocks of the
split; after each batch, π ← (1 − α)·π + α·mean(posterior after the block). Saved as JSON with
the forest's expert ids, so a later forest with other experts is refused, not misread.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_btm import cli_args

HELP = "estimate the cached prior of a domain over a forest's experts (JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_no_progress(parser)
    cli_args.add_forest(parser)
    cli_args.add_data(parser, help="preprocessed data folder (<domain>/<split>.bin/.idx)")
    cli_args.add_domains(parser, help="target domain(s), comma-separated")
    parser.add_argument("--split", default="valid", help="held-out split to estimate on")
    parser.add_argument("--num-sequences", type=int, default=100,
                        help="blocks of seq_length tokens used for the estimate")
    parser.add_argument("--alpha", type=float, default=0.3, help="EMA rate in (0, 1]")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per EMA step")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default 1)")
    cli_args.add_output(parser, help="prior.json (one domain) or a folder receiving <domain>.json")


def output_paths(output: str, domains: list[str]) -> dict[str, Path]:
    out = Path(output)
    if out.suffix == ".json":
        if len(domains) != 1:
            raise ValueError(f"--output {output}: a single .json file holds one domain's prior; "
                             f"give a folder for {len(domains)} domains")
        return {domains[0]: out}
    return {d: out / f"{d}.json" for d in domains}


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_btm.inference.forest_eval import estimate_priors, forest_checkpoints
    from megatron_btm.megatron.parallel import ParallelConfig
    from megatron_btm.routing.prior import save_prior
    domains = args.domains
    paths = output_paths(args.output, domains)
    checkpoints = forest_checkpoints(args.forest)  # verified once, used throughout
    ids = [i for i, _ in checkpoints]
    priors = estimate_priors(args.forest, args.data, domains, split=args.split,
                             num_sequences=args.num_sequences, alpha=args.alpha,
                             batch_size=args.batch_size, checkpoints=checkpoints,
                             parallel=ParallelConfig(tp=args.tp) if args.tp else None,
                             progress=not args.no_progress)
    if torch.distributed.get_rank() == 0:
        for d, prior in priors.items():
            paths[d].parent.mkdir(parents=True, exist_ok=True)
            save_prior(paths[d], prior, ids, d, meta={
                "forest": str(Path(args.forest).resolve()), "data": str(args.data),
                "split": args.split, "num_sequences": args.num_sequences, "alpha": args.alpha,
                "batch_size": args.batch_size})
            top = sorted(zip(prior.tolist(), ids), reverse=True)[:4]
            print(f"{d}: " + ", ".join(f"{i}={p:.3f}" for p, i in top) + f"  -> {paths[d]}")
    return 0
