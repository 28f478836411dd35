"""Sample text from a forest's ensemble (posterior updated token by token) or from one model.

    btm generate --forest ROOT [--prior prior.json] --prompt TEXT --tokenizer PATH
                 [--max-new-tokens 64] [--temperature 1.0] [--top-p 1.0] [--seed 0]
    btm generate --checkpoint C --prompt TEXT --tokenizer PATH ...   (single / averaged model)

Without --prior the ensemble starts from the uniform prior. Every expert is held in memory,
unless --topk K [--route prior|prefix:P]: route first, then only K experts run and are loaded
(serving/). A KV cache is used unless --no-kv-cache.
--clusters DIR [--cluster-topk K]: c-BTM cluster routing instead of the posterior: each token's
weights from the text so far (prompt included) and its distances to the clusters (expert id =
cluster name), the prefix embedding updated token by token; every expert in memory. With
--topk K (serving, route "cluster"): the top K of the prompt's cluster weights run, each token
weighted among those K.
"""
from __future__ import annotations

import argparse

from megatron_btm import cli_args

HELP = "sample from the forest's ensemble or from one (averaged) model, with temperature/top-p"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    cli_args.add_forest(parser, group=src, help="sample from the ensemble of this forest")
    cli_args.add_checkpoint(parser, group=src, help="sample from one (e.g. averaged) model")
    parser.add_argument("--prior", metavar="JSON", help="cached prior (btm prior); with --forest")
    parser.add_argument("--fixed-prior", action="store_true",
                        help="keep the weights at the prior (no posterior update)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (or a folder holding one)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--topk", type=int, default=None, metavar="K",
                        help="with --forest: route first, run only K experts (loaded on demand)")
    parser.add_argument("--route", default="prior", metavar="prior|prefix:P|cluster",
                        help="with --topk: the top K of --prior, or of the posterior over the "
                        "prompt's first P ids (every expert scores them once), or (the route "
                        "--clusters takes) of the prompt's cluster weights")
    parser.add_argument("--lru", type=int, default=1, metavar="N",
                        help="with --topk: models kept in memory beyond the K active")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="re-run the context at every step (the reference path)")
    parser.add_argument("--stop-at-eod", action="store_true", help="stop at the end-of-document id")
    _add_cluster_arguments(parser)
    cli_args.add_output(parser, required=False, metavar="JSON",
                        help="also write {prompt, text, tokens, posterior} to this JSON file")


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_btm.routing.cluster_cli import add_cluster_arguments
    add_cluster_arguments(parser, help="with --forest: route each token by cluster distance")
    parser.add_argument("--cluster-topk", type=int, default=None, metavar="K",
                        help="with --clusters: keep the K nearest clusters' experts at each token")


def _check_cluster_flags(args: argparse.Namespace) -> None:
    if args.clusters is None:
        if args.cluster_topk is not None:
            raise ValueError("--cluster-topk applies to --clusters (cluster routing)")
        if args.route == "cluster":
            raise ValueError("--route cluster: needs --clusters DIR")
        return
    if args.topk is not None:   # serving: route by the prompt's clusters
        if args.route not in ("prior", "cluster"):
            raise ValueError(f"--clusters with --route {args.route}: the serving route of --clusters is cluster")
        if args.cluster_topk is not None:
            raise ValueError("--cluster-topk with --topk: the serving route keeps the --topk K nearest")
        args.route = "cluster"
    elif args.route == "cluster":
        raise ValueError("--route cluster: applies with --topk K (serving)")
    for flag, bad in (("--checkpoint", not args.forest), ("--prior", args.prior),
                      ("--fixed-prior", args.fixed_prior)):
        if bad:
            raise ValueError(f"--clusters with {flag}: cluster routing weighs the forest's "
                             "experts by the text alone (no prior, no posterior)")


def _cluster_routing(args: argparse.Namespace, checkpoints, tokenizer):
    """ClusterRouting of --clusters in the forest's expert order, or None."""
    from megatron_btm.routing.cluster_cli import router_of
    if args.clusters is None:
        return None
    from megatron_btm.routing.cluster_tokens import ClusterRouting
    router = router_of(args).for_experts([i for i, _ in checkpoints])
    return ClusterRouting(router, tokenizer, args.cluster_topk)


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.inference.generate import SamplingConfig, generate
    from megatron_btm.inference.scoring import load_experts
    from megatron_btm.utils.io import atomic_write_json
    _check_cluster_flags(args)
    if args.prior and not args.forest:
        raise ValueError("--prior applies to --forest (the ensemble), not to --checkpoint")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.stop_at_eod:
        cfg.stop_token = tokenizer.eod
    log_prior = None
    if args.forest:
        from megatron_btm.inference.forest_eval import forest_checkpoints
        checkpoints = forest_checkpoints(args.forest)
        if args.prior:
            from megatron_btm.routing.prior import load_prior
            prior, _, _ = load_prior(args.prior, [i for i, _ in checkpoints])
            log_prior = prior.log()
    else:
        checkpoints = [("model", args.checkpoint)]
    from megatron_btm.inference.forest_eval import check_tokenizers
    check_tokenizers(args.forest, checkpoints, tokenizer=args.tokenizer)
    cluster = _cluster_routing(args, checkpoints, tokenizer)
    if args.topk is not None:
        if not args.forest:
            raise ValueError("--topk applies to --forest (routing among experts), not to --checkpoint")
        from megatron_btm.serving.cli import run_generate
        return run_generate(args, cfg, tokenizer, checkpoints, log_prior, cluster)
    experts = load_experts(checkpoints)
    if tokenizer.vocab_size > experts[0].vocab_size:
        raise ValueError(f"--tokenizer {args.tokenizer}: vocab size {tokenizer.vocab_size} exceeds "
                         f"the models' vocab_size {experts[0].vocab_size} (another tokenizer?)")
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eod]
    result = generate(experts, prompt_ids, cfg, log_prior_K=log_prior, update=not args.fixed_prior,
                      kv_cache=not args.no_kv_cache, cluster=cluster)
    text = tokenizer.decode(result.tokens)
    if torch.distributed.get_rank() == 0:
        print(args.prompt + text)
        if args.output:
            atomic_write_json(args.output, {
                "prompt": args.prompt, "text": text, "tokens": result.tokens,
                "experts": [name for name, _ in checkpoints],
                "log_posterior": result.log_posterior, "sampling": vars(cfg),
                **({"router": {"clusters": args.clusters, "temperature": args.cluster_temperature,
                               "topk": args.cluster_topk}} if cluster else {})})
    return 0
