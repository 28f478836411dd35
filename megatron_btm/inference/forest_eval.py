"""Forest-level evaluation and cached priors (the library behind `btm eval` and `btm prior`).

Each expert's per-token log-likelihoods on a domain's blocks do not depend on priors or modes,
so they are computed once (one forward per expert per block, experts loaded one at a time) and
every row of the table — single experts, ensembles, top-k — is cheap math on them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from megatron_btm.inference import blocks as blocks_lib
from megatron_btm.inference import ensemble
from megatron_btm.inference.rows import model_row
from megatron_btm.inference.scoring import IGNORE, model_config_of, score_checkpoints


def forest_checkpoints(forest_root: str | os.PathLike) -> list[tuple[str, Path]]:
    """(expert id, checkpoint folder) of every expert, in the forest's order (cycle, id)."""
    from megatron_btm.forest import Forest
    forest = Forest.open(forest_root)
    return [(rec.id, forest.checkpoint_path(rec.id)) for rec in forest.require_experts()]


def check_tokenizers(forest_root, checkpoints, *, data_dir=None, tokenizer=None) -> None:
    """The forest's tokenizer, every checkpoint's (meta.json), and the data folder's or the
    tokenizer file's must be one tokenizer (TokenizerError naming both sides otherwise)."""
    from megatron_btm.data import identity
    sides = []
    if forest_root is not None:
        from megatron_btm.forest import Forest
        tok = Forest.open(forest_root).tokenizer() or {}
        sides.append((f"forest {Path(forest_root) / 'forest.json'}", tok.get("sha256")))
    if data_dir is not None:
        sides.append((f"--data {Path(data_dir) / 'tokenizer.json'}", identity.tokenizer_of(data_dir)))
    if tokenizer is not None:
        sides.append((f"--tokenizer {tokenizer}", identity.tokenizer_of(tokenizer)))
    identity.check_checkpoints(checkpoints, *sides)


def _tp_of(parallel) -> int | None:
    if parallel is None:
        return None
    if getattr(parallel, "pp", 1) != 1:
        raise ValueError(f"parallel.pp={parallel.pp}: evaluation runs at pp=1 (any tp); "
                         "checkpoints saved at any pp load into it")
    return parallel.tp


def _common_shape(checkpoints: Sequence[tuple[str, Path]]) -> tuple[int, int]:
    """(seq_length, vocab_size) every model can read: the shortest context, one shared vocab."""
    cfgs = {name: model_config_of(path)[0] for name, path in checkpoints}
    vocabs = {n: c.vocab_size for n, c in cfgs.items()}
    if len(set(vocabs.values())) > 1:
        raise ValueError(f"models have different vocab sizes {vocabs}; they must share one tokenizer")
    return min(c.seq_length for c in cfgs.values()), next(iter(vocabs.values()))


def _read_blocks(data_dir, domains, split, seq_length, vocab, max_blocks, layout):
    if not domains:
        raise ValueError("domains: empty; name at least one domain to evaluate")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains: duplicates in {list(domains)}")
    return {d: blocks_lib.read_eval_blocks(data_dir, d, split, seq_length, layout=layout,
                                           max_blocks=max_blocks, vocab_size=vocab)
            for d in domains}


def estimate_priors(forest_root: str | os.PathLike, data_dir: str | os.PathLike,
                    domains: Sequence[str], *, split: str = "valid", num_sequences: int = 100,
                    alpha: float = 0.3, batch_size: int = 8, layout: str = "stream",
                    parallel=None, checkpoints: Sequence[tuple[str, Path]] | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """{domain: cached prior [K] float64} over the forest's experts (in `forest_checkpoints`
    order), each from the first `num_sequences` blocks of the domain's `split`, EMA rate
    `alpha`, one EMA step per batch of `batch_size` blocks (prior.estimate_cached_prior).
    `checkpoints`: the (id, path) list to use instead of reading the forest again (a caller
    that already holds `forest_checkpoints(forest_root)` keeps ids and priors consistent)."""
    from megatron_btm.routing.prior import estimate_cached_prior
    if num_sequences < 1 or batch_size < 1:
        raise ValueError(f"num_sequences={num_sequences}, batch_size={batch_size}: both must be >= 1")
    checkpoints = list(checkpoints) if checkpoints is not None else forest_checkpoints(forest_root)
    check_tokenizers(forest_root, checkpoints, data_dir=data_dir)
    seq_length, vocab = _common_shape(checkpoints)
    blocks = _read_blocks(data_dir, domains, split, seq_length, vocab, num_sequences, layout)
    ll = score_checkpoints(checkpoints, blocks, tp=_tp_of(parallel), batch_size=batch_size,
                           progress=progress)
    priors = {}
    for d in domains:
        ll_NTK = ll[d]  # 0 at padding: carries no evidence
        batches = [ll_NTK[i:i + batch_size] for i in range(0, ll_NTK.shape[0], batch_size)]
        priors[d] = estimate_cached_prior(batches, len(checkpoints), alpha=alpha)
    return priors


def evaluate_forest(forest_root: str | os.PathLike, data_dir: str | os.PathLike,
                    domains: Sequence[str], *, split: str = "test",
                    priors: Mapping[str, Any] | None = None, topk: Sequence[int] = (1, 2),
                    modes: Sequence[str] = ensemble.DEFAULT_MODES,
                    extra_models: Mapping[str, str | os.PathLike] | None = None,
                    max_blocks: int | None = None, layout: str = "stream",
                    batch_size: int = 8, single_experts: bool = True,
                    window: int | None = None, decay: float | None = None,
                    parallel=None, checkpoints: Sequence[tuple[str, Path]] | None = None,
                    progress: bool = False, clusters=None) -> dict[str, Any]:
    """Per-domain perplexity table of a forest (JSON-serialisable).

    priors: {domain: prior [K] in forest order} (tensor or list); domains without one get only
    the rows that need no cached prior. extra_models: {name: checkpoint} evaluated as single
    models (e.g. parameter averages), rows `model/<name>`. window / decay: forget old evidence
    in the updating posterior (routing.posterior.prefix_log_posterior); None = whole prefix.
    checkpoints: as in `estimate_priors`. clusters: a routing.cluster.ClusterRouter (expert
    id == cluster name) adds the rows ensemble/cluster and top<k>/cluster (inference.cluster_rows)
    and "cluster": {"temperature", "mean_weights": {domain: [K]}}; the text is decoded with
    data_dir's tokenizer.

    Returns {"split", "seq_length", "layout", "experts": [ids], "rows": [row names in table
    order], "blocks": {domain: number of blocks}, "results": {domain: {row: {"nll", "ppl",
    "tokens"}}}} with nll in nats per scored token.
    """
    ensemble.check_modes(modes)
    bad_k = [k for k in topk if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad_k:
        raise ValueError(f"topk={list(topk)}: each k must be a positive integer, got {bad_k}")
    checkpoints = list(checkpoints) if checkpoints is not None else forest_checkpoints(forest_root)
    ids = [name for name, _ in checkpoints]
    extra = [(model_row(n), Path(p)) for n, p in (extra_models or {}).items()]
    check_tokenizers(forest_root, checkpoints + extra, data_dir=data_dir)
    seq_length, vocab = _common_shape(checkpoints + extra)
    priors = dict(priors or {})
    unknown = sorted(set(priors) - set(domains))
    if unknown:
        raise ValueError(f"priors given for domain(s) {unknown} that are not evaluated "
                         f"(domains: {list(domains)})")
    prior_tensors = {d: torch.as_tensor(p, dtype=torch.float64) for d, p in priors.items()}
    for d, p in prior_tensors.items():
        if p.shape != (len(ids),):
            raise ValueError(f"prior of domain {d!r}: {p.numel()} values but the forest has "
                             f"{len(ids)} experts {ids}")
    if clusters is not None:
        from megatron_btm.data.tokenizer import load_tokenizer
        clusters, tokenizer = clusters.for_experts(ids), load_tokenizer(Path(data_dir) / "tokenizer.json")
    blocks = _read_blocks(data_dir, domains, split, seq_length, vocab, max_blocks, layout)
    tp = _tp_of(parallel)
    ll = score_checkpoints(checkpoints, blocks, tp=tp, batch_size=batch_size, progress=progress)
    extra_ll = score_checkpoints(extra, blocks, tp=tp, batch_size=batch_size,
                                 progress=progress) if extra else {}
    results: dict[str, dict] = {}
    mean_weights: dict[str, list[float]] = {}
    for d in domains:
        valid_NT = blocks[d][:, 1:] != IGNORE
        rows = ensemble.evaluate_rows(ll[d], valid_NT, ids, prior_K=prior_tensors.get(d),
                                      modes=modes, topk=topk, single_experts=single_experts,
                                      window=window, decay=decay)
        for j, (name, _) in enumerate(extra):
            rows[name] = ensemble.single_model_row(extra_ll[d][..., j], valid_NT)
        if clusters is not None:
            from megatron_btm.inference.cluster_rows import cluster_rows
            crows, mean_weights[d] = cluster_rows(ll[d], valid_NT, blocks[d], clusters, tokenizer, topk)
            rows.update(crows)
        results[d] = rows
    order: list[str] = []
    for rows in results.values():
        order.extend(r for r in rows if r not in order)
    table = {"split": split, "seq_length": seq_length, "layout": layout, "experts": ids,
             "window": window, "decay": decay,
             "rows": order, "blocks": {d: int(blocks[d].shape[0]) for d in domains},
             "results": results}
    if clusters is not None:
        table["cluster"] = {"temperature": clusters.temperature, "mean_weights": mean_weights}
    return table


def format_table(table: Mapping[str, Any]) -> str:
    """Perplexities as text: rows = models/ensembles, columns = domains."""
    domains = list(table["results"])
    width = max([len(r) for r in table["rows"]] + [8])
    cols = [max(len(d), 9) for d in domains]
    lines = ["  ".join([f"{'ppl':<{width}}"] + [f"{d:>{c}}" for d, c in zip(domains, cols)])]
    for row in table["rows"]:
        cells = []
        for d, c in zip(domains, cols):
            cell = table["results"][d].get(row)
            cells.append(f"{cell['ppl']:>{c}.3f}" if cell else f"{'-':>{c}}")
        lines.append("  ".join([f"{row:<{width}}"] + cells))
    return "\n".join(lines)
