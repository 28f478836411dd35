"""Per-domain perplexity of a forest: single experts, ensembles, top-k, averaged models.

    btm eval --forest ROOT --data DATA_DIR --domains a,b [--split test] [--priors DIR]
             [--modes uniform,cached] [--topk 1,2,4] [--checkpoint [NAME=]C,...]
             [--max-blocks N] --output results.json

Rows: expert/<id> (each expert alone), ensemble/<mode> (uniform | cached prior, posterior
updating; *-fixed: weights = the prior), top<k>/doc (top-k of the cached prior), top<k>/token
(top-k of the posterior), model/<name> (each --checkpoint). --priors DIR holds
<domain>.json files from `btm prior`; with it, every evaluated domain needs one.
--clusters DIR: also the c-BTM rows ensemble/cluster and top<k>/cluster (per-token weights
from the prefix's distances to the clusters of `btm cluster fit`; expert id = cluster name).
--route prior|prefix:P --topk k: the serving view (serving/routed.py), one k, only the chosen
experts run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_btm import cli_args

HELP = "perplexity table of a forest: experts, ensembles (uniform/cached prior, top-k), averages"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_args.add_no_progress(parser)
    cli_args.add_forest(parser)
    cli_args.add_data(parser)
    cli_args.add_domains(parser, help="comma-separated domains to evaluate")
    parser.add_argument("--split", default="test", help="split to evaluate on")
    parser.add_argument("--priors", metavar="DIR", help="folder of <domain>.json cached priors")
    parser.add_argument("--modes", default=["uniform", "cached"], metavar="A,B",
                        type=cli_args.comma_list("--modes"), help="ensemble rows: uniform, cached, uniform-fixed, cached-fixed (cached* "
                        "rows need --priors and are left out without it)")
    parser.add_argument("--topk", default=None, metavar="K,K", type=_topk,
                        help="comma-separated k values of the top-k rows, each at most the number "
                        "of experts ('' for none; default 1,2 where the forest has that many)")
    cli_args.add_checkpoint(parser, multiple=True, metavar="[NAME=]C",
                            help="a single (e.g. parameter-averaged) model to evaluate, row "
                            "model/<NAME> (default NAME: the folder's name)")
    parser.add_argument("--max-blocks", type=int, default=None, help="blocks per domain (default all)")
    parser.add_argument("--layout", default="stream", choices=("stream", "document"),
                        help="blocks from the concatenated split or per document")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass")
    parser.add_argument("--window", type=int, default=None,
                        help="posterior counts only the last N tokens (default: whole prefix)")
    parser.add_argument("--decay", type=float, default=None,
                        help="posterior weighs a token s steps back by decay^s (0 < decay <= 1)")
    parser.add_argument("--no-single-experts", action="store_true", help="omit the expert/<id> rows")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default 1)")
    parser.add_argument("--route", default=None, metavar="prior|prefix:P",
                        help="serving view: route each block first (top --topk of the cached "
                        "prior, or of the posterior over its first P ids), run only those experts; "
                        "reports perplexity and cost (expert forwards per token, wall time)")
    parser.add_argument("--lru", type=int, default=1, metavar="N",
                        help="with --route: models kept in memory beyond the k active")
    _add_cluster_arguments(parser)
    cli_args.add_output(parser, metavar="JSON", help="results JSON file (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_btm.routing.cluster_cli import add_cluster_arguments
    add_cluster_arguments(parser, help="also the cluster-routing rows ensemble/cluster and "
                          "top<k>/cluster")


def _cluster_router(args: argparse.Namespace):
    from megatron_btm.routing.cluster_cli import router_of
    if args.clusters and args.route:
        raise ValueError(f"--clusters with --route {args.route}: the serving view has no cluster "
                         "route; drop --route for the cluster rows of the full table")
    return router_of(args)


def _topk(text: str) -> list[int]:
    if not text.strip():
        return []
    return cli_args.comma_list("--topk", int, what="an integer")(text)


def _check_topk(topk: list[int] | None, ids: list[str]) -> list[int]:
    if topk is None:
        return [k for k in (1, 2) if k <= len(ids)]
    too_big = [k for k in topk if k > len(ids)]
    if too_big:
        raise ValueError(f"--topk {','.join(map(str, topk))}: k={too_big[0]} is more than the "
                         f"forest's {len(ids)} experts {ids}; give k <= {len(ids)}")
    return topk


def _extra_models(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or Path(path.rstrip("/")).name
        if name in out:
            raise ValueError(f"--checkpoint: name {name!r} used twice; write NAME=PATH")
        if not Path(path).exists():
            raise FileNotFoundError(f"--checkpoint {item}: {path} does not exist")
        out[name] = path
    return out


def load_priors(priors_dir: str, domains: list[str], expert_ids: list[str]) -> dict:
    from megatron_btm.routing.prior import load_prior
    root = Path(priors_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--priors {priors_dir}: not a folder")
    out = {}
    for d in domains:
        path = root / f"{d}.json"
        if not path.is_file():
            raise FileNotFoundError(f"--priors: no prior file {path} for domain {d!r} "
                                    f"(estimate it with `btm prior --domains {d}`)")
        prior, _, meta = load_prior(path, expert_ids)
        if meta.get("domain") not in (None, d):
            raise ValueError(f"--priors: {path} holds the prior of domain {meta['domain']!r}, "
                             f"not {d!r}")
        out[d] = prior
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_btm.inference.forest_eval import evaluate_forest, forest_checkpoints, format_table
    from megatron_btm.megatron.parallel import ParallelConfig
    from megatron_btm.utils.io import atomic_write_json
    from megatron_btm.errors import OutputExists
    from megatron_btm.inference.forest_eval import check_tokenizers
    if Path(args.output).exists() and not args.overwrite:
        raise OutputExists(f"--output {args.output}: already exists; pass --overwrite to replace it")
    clusters = _cluster_router(args)
    if args.route:
        from megatron_btm.forest import Forest
        forest = Forest.open(args.forest)
        check_tokenizers(args.forest, [(r.id, forest.root / r.path / "checkpoint")
                                       for r in forest.require_experts()], data_dir=args.data)
        from megatron_btm.serving.cli import run_eval
        args.topk = [1, 2] if args.topk is None else args.topk  # serving asks for exactly one
        return run_eval(args)
    domains, modes = args.domains, list(args.modes)
    checkpoints = forest_checkpoints(args.forest)  # verified once, used throughout
    extra_models = _extra_models(args.checkpoints)
    check_tokenizers(args.forest, checkpoints + list(extra_models.items()), data_dir=args.data)
    ids = [i for i, _ in checkpoints]
    topk = _check_topk(args.topk, ids)
    priors = load_priors(args.priors, domains, ids) if args.priors else None
    if priors is None and any(m.startswith("cached") for m in modes):
        modes = [m for m in modes if not m.startswith("cached")]  # no priors: nothing cached
    table = evaluate_forest(args.forest, args.data, domains, split=args.split, priors=priors,
                            topk=topk, modes=modes,
                            extra_models=extra_models,
                            max_blocks=args.max_blocks, layout=args.layout,
                            batch_size=args.batch_size, single_experts=not args.no_single_experts,
                            window=args.window, decay=args.decay, checkpoints=checkpoints,
                            parallel=ParallelConfig(tp=args.tp) if args.tp else None,
                            progress=not args.no_progress, clusters=clusters)
    table["priors"] = {d: p.tolist() for d, p in (priors or {}).items()}
    if torch.distributed.get_rank() == 0:
        atomic_write_json(args.output, table)
        print(format_table(table))
        print(f"wrote {args.output}")
    return 0
