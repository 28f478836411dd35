"""Branch stage: initialise new experts from the forest as it is at the start of a cycle.

For each new domain d: estimate the domain prior π over the existing experts on a held-out
sample of d (DEMix cached prior), keep the top-k experts, and write their π-weighted parameter
average as d's starting checkpoint, with a branch.json recording parents and weights (the
lineage the merge stage registers). With no experts yet (the first cycle), or policy "seed",
the expert starts as a copy of the seed.

Weights `cluster` (c-BTM): π over the existing experts is instead the mean cluster weight of the
new domain's first `num_sequences` documents (routing.cluster.domain_branch_weights), over the
clusters that have an expert in the snapshot (expert id = cluster name; an expert without a
cluster is an error; clusters not trained yet, the new domains among them, are left out).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_btm.stages.train import BRANCH_FILE

POLICIES = ("topk", "all", "uniform", "seed")
WEIGHTS = ("prior", "cluster")


@dataclass(kw_only=True)
class BranchConfig:
    """How new experts are initialised."""

    policy: str = "topk"
    """topk: π-weighted average of the k most likely experts; all: π-weighted average of every
    expert; uniform: plain average of every expert; seed: copy of the seed."""
    k: int = 2
    """Experts to average with policy topk."""
    split: str = "valid"
    """Split of the new domain used to estimate π."""
    num_sequences: int = 100
    """Held-out sequences used to estimate π."""
    alpha: float = 0.3
    """EMA rate of the cached-prior estimate."""
    weights: str = "prior"
    """π of policies topk/all: prior = the cached prior (the experts score the held-out text);
    cluster = the documents' cluster distances (needs `clusters`)."""
    clusters: str | None = None
    """With weights cluster: a `btm cluster fit` folder."""
    cluster_temperature: float = 0.1
    """With weights cluster: T of w_j ∝ exp(−d_j / T)."""

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"branch weights={self.weights!r}: valid weights are {WEIGHTS}")
        if self.weights == "cluster" and not self.clusters:
            raise ValueError("branch weights='cluster': needs clusters (a `btm cluster fit` folder)")
        if self.weights != "cluster" and self.clusters:
            raise ValueError(f"branch clusters={self.clusters!r}: only used with weights 'cluster'")
        if self.policy not in POLICIES:
            raise ValueError(f"branch policy={self.policy!r}: valid policies are {POLICIES}")
        if self.k < 1:
            raise ValueError(f"branch k={self.k}: must be >= 1")
        if self.num_sequences < 1:
            raise ValueError(f"branch num_sequences={self.num_sequences}: must be >= 1")


def branch_weights(expert_ids: list[str], prior: list[float] | None, cfg: BranchConfig
                   ) -> list[tuple[str, float]]:
    """(expert id, weight) pairs of the initialisation; weights sum to 1. Pure."""
    n = len(expert_ids)
    if cfg.policy == "seed" or n == 0:
        return [("seed", 1.0)]
    if cfg.policy == "uniform":
        return [(e, 1.0 / n) for e in expert_ids]
    if prior is None or len(prior) != n:
        raise ValueError(f"policy {cfg.policy!r} needs a prior over the {n} experts")
    if cfg.policy == "topk" and cfg.k > n:
        raise ValueError(f"branch k={cfg.k} but the forest has only {n} experts")
    keep = n if cfg.policy == "all" else cfg.k
    ranked = sorted(range(n), key=lambda j: (-prior[j], expert_ids[j]))[:keep]
    total = sum(prior[j] for j in ranked)
    if total <= 0:
        return [(expert_ids[j], 1.0 / keep) for j in ranked]
    return [(expert_ids[j], prior[j] / total) for j in ranked]


def branch(forest_root: str | Path, *, domains: list[str], data_dir: str | Path,
           output_dir: str | Path, cfg: BranchConfig | None = None, cycle: int | None = None,
           progress: bool = False) -> dict[str, dict[str, Any]]:
    """Write `<output_dir>/<domain>/` (weights + branch.json, one atomic folder) for each
    domain; return the records. The parents are chosen among the experts of cycles before
    `cycle` (the forest as it was at the cycle's start, whatever the cycle merged since).
    `cycle` is given by the stage graph; None (a standalone `btm branch`) means the next one."""
    from megatron_btm.averaging.apply import average_checkpoints
    from megatron_btm.forest import Forest
    from megatron_btm.forest.names import check_domain

    cfg = cfg or BranchConfig()
    forest = Forest.open(forest_root)
    if cycle is None:
        cycle = 1 + max([e.cycle for e in forest.experts()], default=0)
    snapshot = forest.snapshot(before_cycle=cycle).ids
    verified: dict[str, Path] = {}  # checkpoint_path hashes every file: once per parent

    def checkpoint(parent: str) -> Path:
        if parent not in verified:
            verified[parent] = (forest.seed_checkpoint_path() if parent == "seed"
                                else forest.checkpoint_path(parent))
        return verified[parent]

    priors: dict[str, list[float]] = {}
    if snapshot and cfg.policy in ("topk", "all") and cfg.weights == "cluster":
        priors = cluster_priors(cfg, data_dir, list(domains), snapshot)
    elif snapshot and cfg.policy in ("topk", "all"):
        from megatron_btm.inference import estimate_priors
        estimated = estimate_priors(forest_root, data_dir, list(domains), split=cfg.split,
                                    num_sequences=cfg.num_sequences, alpha=cfg.alpha,
                                    checkpoints=[(e, checkpoint(e)) for e in snapshot],
                                    progress=progress)
        priors = {d: [float(x) for x in estimated[d]] for d in domains}
    records = {}
    for domain in domains:
        check_domain(domain)
        parents = branch_weights(snapshot, priors.get(domain), cfg)
        paths = [checkpoint(p) for p, _ in parents]
        out = Path(output_dir) / domain
        record = {"domain": domain, "cycle": cycle, "policy": cfg.policy if snapshot else "seed",
                  "k": cfg.k, "weights": cfg.weights, "clusters": cfg.clusters, "parents": [{"id": p, "weight": w} for p, w in parents],
                  "forest_snapshot": snapshot, "prior": priors.get(domain),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        average_checkpoints(paths, [w for _, w in parents], out, progress=progress, overwrite=True,
                            meta_extra={"kind": "branch", "branch": record},
                            extra_files={BRANCH_FILE: record})
        records[domain] = record
    return records


def cluster_priors(cfg: BranchConfig, data_dir, domains: list[str], snapshot: list[str]
                   ) -> dict[str, list[float]]:
    """{domain: π over `snapshot`} from the cluster distances of each domain's documents."""
    from megatron_btm.data.datasets import read_documents
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.routing.cluster import domain_branch_weights
    from megatron_btm.routing.cluster_cli import load_router
    from megatron_btm.routing.cluster_tokens import ids_text
    where = "branch clusters"
    router = load_router(cfg.clusters, cfg.cluster_temperature, where)
    router = router.for_experts(list(snapshot), where, partial=True)
    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer.json")
    out = {}
    for d in domains:
        docs = (ids_text(tokenizer, doc) for doc in read_documents(data_dir, d, cfg.split,
                                                                   max_docs=cfg.num_sequences))
        out[d] = [float(x) for x in domain_branch_weights(router, docs)]
    return out
