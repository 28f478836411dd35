"""`--clusters DIR` and `--cluster-temperature T`: cluster routing (c-BTM) in eval, generate, branch.

    btm eval     ... --clusters CLUSTERS     adds the rows ensemble/cluster and top<k>/cluster
    btm generate ... --clusters CLUSTERS     each token's weights from the prefix's distances
    btm branch   ... --weights cluster --clusters CLUSTERS   parents weighted by the new
                                             domain's documents' cluster distances

CLUSTERS is a `btm cluster fit` folder (the option is spelled as in `btm cluster assign`). The
cached prior stays the default everywhere; without --clusters nothing changes. Experts and
clusters are matched by name: a forest expert's id is the cluster's name (ClusterRouter.for_experts).
"""
from __future__ import annotations

import argparse

from megatron_btm.routing import DEFAULT_TEMPERATURE


def add_cluster_arguments(parser: argparse.ArgumentParser, *, help: str) -> None:
    parser.add_argument("--clusters", default=None, metavar="DIR",
                        help=help + " (a `btm cluster fit` folder; expert id = cluster name)")
    parser.add_argument("--cluster-temperature", type=float, default=DEFAULT_TEMPERATURE,
                        metavar="T", help="with --clusters: T of w_j ∝ exp(−d_j / T)")


def load_router(path: str, temperature: float = DEFAULT_TEMPERATURE, where: str = "--clusters"):
    """ClusterRouter of a clusters folder; errors (missing folder, another format version,
    a bad temperature) are one line naming `where`."""
    from megatron_btm.routing.cluster import ClusterRouter
    try:
        return ClusterRouter.load(path, temperature)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where} {path}: {_tail(e, path)}") from None
    except ValueError as e:
        raise ValueError(f"{where} {path}: {_tail(e, path)}") from None


def _tail(err: Exception, path: str) -> str:
    msg = str(err)
    return msg[len(str(path)) + 2:] if msg.startswith(f"{path}: ") else msg


def router_of(args: argparse.Namespace):
    """The router of --clusters, or None."""
    if getattr(args, "clusters", None) is None:
        return None
    return load_router(args.clusters, args.cluster_temperature)
