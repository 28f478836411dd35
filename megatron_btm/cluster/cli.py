"""Unsupervised domains (c-BTM): cluster a corpus's documents, then split the corpus by cluster.

    btm cluster fit --corpus C [--domains a,b] --k K --output CLUSTERS [--seed 0]
    btm cluster assign --clusters CLUSTERS --corpus C [--domains a,b] --output OUT

fit: tf-idf -> TruncatedSVD(100) -> L2 -> balanced k-means, streamed over the corpus.
assign: nearest centroid -> OUT/<cluster>/{train,valid,test}.jsonl (a corpus for `btm
preprocess`), OUT/report.json (sizes, purity), OUT/heatmap.png.
"""
from __future__ import annotations

import argparse
import time

from megatron_btm import cli_args

HELP = "unsupervised domains (c-BTM): fit balanced k-means clusters, split a corpus by cluster"


def _common(p: argparse.ArgumentParser) -> None:
    cli_args.add_corpus(p, help="corpus folder (<domain>/<split>.jsonl)")
    cli_args.add_domains(p, required=False,
                         help="comma-separated domains (provenance labels, used only for the "
                              "report); default: all")
    p.add_argument("--batch-size", type=int, default=4096, help="documents per batch")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed JSONL lines instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    cli_args.add_no_progress(p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cluster_command", metavar="{fit,assign}")
    fit = sub.add_parser("fit", help="fit balanced k-means clusters on a corpus",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(fit)
    fit.add_argument("--k", type=int, required=True, help="number of clusters (2-128)")
    cli_args.add_output(fit, metavar="DIR", help="clusters folder to write")
    fit.add_argument("--split", default="train", help="split to fit on")
    fit.add_argument("--names", type=cli_args.comma_list("--names"), default=None,
                     help="comma-separated cluster names (valid domain names); default "
                          "<prefix>0 ... <prefix>K-1, zero-padded (cluster00 ... cluster15)")
    fit.add_argument("--prefix", default="cluster", help="prefix of the default cluster names")
    fit.add_argument("--dim", type=int, default=100, help="SVD dimensions")
    fit.add_argument("--max-features", type=int, default=32768, help="vocabulary size at most")
    fit.add_argument("--min-df", type=int, default=2, help="minimum document frequency of a word")
    fit.add_argument("--sample-docs", type=int, default=20000,
                     help="documents sampled for vocabulary, idf, SVD and initialisation")
    fit.add_argument("--balance", choices=["documents", "bytes"], default="documents",
                     help="what every cluster holds equally: documents (c-BTM) or bytes of text")
    fit.add_argument("--tolerance", type=float, default=0.0,
                     help="balance tolerance: each mini-batch's cluster sizes within "
                          "[B/K(1-tol), B/K(1+tol)] (0: equal sizes, as in c-BTM)")
    fit.add_argument("--max-iter", type=int, default=30, help="balanced Lloyd iterations at most")
    fit.add_argument("--seed", type=int, default=0, help="seed of the sample, SVD and k-means++")
    fit.set_defaults(_cluster_run=_run_fit)
    asg = sub.add_parser("assign", help="assign documents to their nearest centroid -> a corpus",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(asg)
    asg.add_argument("--clusters", required=True, help="clusters folder from `btm cluster fit`")
    cli_args.add_output(asg, metavar="DIR", help="corpus folder to write")
    asg.add_argument("--splits", type=cli_args.comma_list("--splits"), default=["train", "valid", "test"],
                     help="comma-separated splits to assign")
    asg.set_defaults(_cluster_run=_run_assign)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "_cluster_run", None):
        raise ValueError("give a subcommand: fit or assign (see btm cluster --help)")
    return args._cluster_run(args)


def _run_fit(args: argparse.Namespace) -> int:
    from megatron_btm.cluster.fit import FitConfig, fit_clusters
    cfg = FitConfig(corpus=args.corpus, output=args.output, k=args.k, domains=args.domains,
                    split=args.split, names=args.names, prefix=args.prefix, dim=args.dim,
                    max_features=args.max_features, min_df=args.min_df,
                    sample_docs=args.sample_docs, batch_size=args.batch_size,
                    balance=args.balance, tolerance=args.tolerance, max_iter=args.max_iter,
                    seed=args.seed, progress=not args.no_progress, overwrite=args.overwrite,
                    skip_bad_lines=args.skip_bad_lines)
    model = fit_clusters(cfg)
    m = model.meta
    extra = f", balanced purity {m['balanced_purity']:.3f}" if "balanced_purity" in m else ""
    print(f"{model.k} clusters of {m['num_documents']} documents (dim {model.featurizer.dim}, "
          f"{len(model.featurizer.vocabulary)} words, {m['iterations']} iterations, "
          f"converged={m['converged']}{extra}) in {m['seconds']:.1f} s -> {args.output}")
    return 0


def _run_assign(args: argparse.Namespace) -> int:
    from megatron_btm.cluster.assign import AssignConfig, assign_corpus
    t0 = time.time()
    cfg = AssignConfig(clusters=args.clusters, corpus=args.corpus, output=args.output,
                       domains=args.domains, splits=tuple(args.splits), batch_size=args.batch_size,
                       progress=not args.no_progress, overwrite=args.overwrite,
                       skip_bad_lines=args.skip_bad_lines)
    report = assign_corpus(cfg)
    sizes = ", ".join(f"{n}={v}" for n, v in report["sizes"].items())
    pur = f"; purity {report['purity']:.3f}" if report["purity"] is not None else ""
    print(f"{sizes}{pur} in {time.time() - t0:.1f} s -> {args.output}")
    for item in report["empty_splits"]:
        print(f"warning: {item} is empty (btm preprocess needs --skip-bad-lines)")
    return 0
