"""`btm eval --route ...` and `btm generate --topk ...`: the serving view's command glue."""
from __future__ import annotations

import argparse

from megatron_btm.errors import ConfigError


def _pool(checkpoints, k: int, lru: int, tp=None):
    from megatron_btm.serving.pool import ExpertPool
    if isinstance(lru, bool) or not isinstance(lru, int) or lru < 0:
        raise ConfigError(f"--lru {lru!r}: must be an integer >= 0 (spare models in memory)")
    return ExpertPool(checkpoints, capacity=k + lru, tp=tp)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from megatron_btm.inference.eval_cli import load_priors
    from megatron_btm.inference.forest_eval import _common_shape, _read_blocks, forest_checkpoints
    from megatron_btm.serving.route import Route
    from megatron_btm.serving.routed import evaluate_routed
    from megatron_btm.utils.io import atomic_write_json
    if len(args.topk) != 1:
        raise ConfigError(f"--route {args.route}: give exactly one --topk k, got {args.topk}")
    route = Route.parse(args.route, args.topk[0])
    checkpoints = forest_checkpoints(args.forest)
    route.check(len(checkpoints))
    ids = [i for i, _ in checkpoints]
    priors = load_priors(args.priors, args.domains, ids) if args.priors else {}
    seq_length, vocab = _common_shape(checkpoints)
    blocks = _read_blocks(args.data, args.domains, args.split, seq_length, vocab, args.max_blocks,
                          args.layout)
    pool = _pool(checkpoints, route.topk, args.lru, tp=args.tp)
    table = evaluate_routed(pool, blocks, route, priors, batch_size=args.batch_size)
    table.update(split=args.split, seq_length=seq_length, layout=args.layout,
                 priors={d: p.tolist() for d, p in priors.items()})
    if torch.distributed.get_rank() == 0:
        atomic_write_json(args.output, table)
        print(f"route {table['route']}  top-{route.topk} of {len(ids)} experts")
        print(f"{'domain':<16}{'ppl':>10}{'fwd/token':>11}{'ms/token':>10}")
        for d, r in table["results"].items():
            print(f"{d:<16}{r['ppl']:>10.3f}{r['expert_forwards_per_token']:>11.2f}"
                  f"{r['ms_per_token']:>10.3f}")
        print(f"wrote {args.output}")
    return 0


def run_generate(args: argparse.Namespace, cfg, tokenizer, checkpoints, log_prior,
                 cluster=None) -> int:
    import torch

    from megatron_btm.serving.route import Route
    from megatron_btm.serving.routed import generate_routed
    from megatron_btm.utils.io import atomic_write_json
    route = Route.parse(args.route, args.topk)
    route.check(len(checkpoints))
    pool = _pool(checkpoints, route.topk, args.lru)
    vocab = pool.get([pool.ids[0]])[0].vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"--tokenizer {args.tokenizer}: vocab size {tokenizer.vocab_size} exceeds "
                         f"the models' vocab_size {vocab} (another tokenizer?)")
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eod]
    prior = None if log_prior is None else log_prior.exp()
    out = generate_routed(pool, [prompt_ids], cfg, route, prior, update=not args.fixed_prior,
                          kv_cache=not args.no_kv_cache, cluster=cluster)
    result = out["results"][0]
    text = tokenizer.decode(result.tokens)
    if torch.distributed.get_rank() == 0:
        print(args.prompt + text)
        print(f"route {route.label()} top-{route.topk}: experts {out['chosen'][0]}, "
              f"{out['expert_forwards_per_token']:.2f} expert forwards/token, "
              f"{out['ms_per_token']:.2f} ms/token", flush=True)
        if args.output:
            atomic_write_json(args.output, {
                "prompt": args.prompt, "text": text, "tokens": result.tokens,
                "experts": out["chosen"][0], "route": route.label(), "topk": route.topk,
                "log_posterior": result.log_posterior, "sampling": vars(cfg),
                "cost": {k: out[k] for k in ("expert_forwards_per_token", "seconds",
                                             "ms_per_token", "max_models_in_memory")}})
    return 0
