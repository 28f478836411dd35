"""`btm cluster assign`: each document to its nearest centroid -> a corpus folder by cluster.

    OUT/<cluster>/<split>.jsonl   {"text": ..., "source": <provenance domain>} one a line, in
                                  corpus order (domain by domain, line by line): `btm preprocess
                                  --corpus-dir OUT` reads it as is (it uses "text" only)
    OUT/report.json               sizes per cluster and split, cluster x provenance counts,
                                  purity by documents and by bytes (when the corpus has
                                  >= 2 domains), empty splits
    OUT/heatmap.png               cluster x provenance of the first split (share, with counts)

Deterministic (no randomness; nearest centroid, ties to the lowest index) and atomic (OUT is
built under a .tmp- name and renamed when complete). A cluster that receives no document of a
split gets an empty file and is listed under "empty_splits" (preprocess refuses empty files
unless --skip-bad-lines).
"""
from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_btm.cluster import text as T
from megatron_btm.cluster.artefact import load_clusters
from megatron_btm.cluster.report import contingency, heatmap_png, purity, table
from megatron_btm.utils.io import atomic_dir, atomic_write_json, atomic_write_text

REPORT_FORMAT = "btm-cluster-report"


@dataclass(kw_only=True)
class AssignConfig:
    clusters: str
    """Clusters folder written by `btm cluster fit`."""
    corpus: str
    """Corpus folder: <domain>/<split>.jsonl."""
    output: str
    """Corpus folder to write: <cluster>/<split>.jsonl, report.json, heatmap.png."""
    domains: list[str] | None = None
    """Domains to read; None = all."""
    splits: tuple[str, ...] = ("train", "valid", "test")
    """Splits to assign; each domain must have them."""
    batch_size: int = 4096
    """Documents embedded at a time."""
    progress: bool = True
    overwrite: bool = False
    skip_bad_lines: bool = False

    def __post_init__(self):
        self.splits = tuple(self.splits)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits={list(self.splits)}: give distinct split names")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        out, corpus = Path(self.output).resolve(), Path(self.corpus).resolve()
        if out == corpus or corpus in out.parents:
            raise ValueError(f"output={self.output}: must not be the corpus folder or inside it")
        if out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.output}: already exists (pass --overwrite to replace it)")


def assign_corpus(cfg: AssignConfig) -> dict:
    """Write the clustered corpus; return the report (also OUT/report.json)."""
    from tqdm import tqdm
    model = load_clusters(cfg.clusters)
    domains = T.resolve_domains(cfg.corpus, cfg.domains)
    files = {s: T.split_files(cfg.corpus, domains, s) for s in cfg.splits}  # all checked first
    K, D = model.k, len(domains)
    counts, nbytes = {}, {}
    with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
        for split in cfg.splits:
            counts[split] = np.zeros((K, D), dtype=np.int64)
            nbytes[split] = np.zeros((K, D), dtype=np.int64)
            with ExitStack() as stack:
                outs = []
                for name in model.names:
                    (tmp / name).mkdir(exist_ok=True)
                    outs.append(stack.enter_context(open(tmp / name / f"{split}.jsonl", "w",
                                                         encoding="utf-8")))
                bar = stack.enter_context(tqdm(desc=f"assign {split}", unit="doc", file=sys.stderr,
                                               disable=not cfg.progress, dynamic_ncols=True))
                docs = T.iter_documents(files[split], skip_bad_lines=cfg.skip_bad_lines)
                for batch in T.batched(docs, cfg.batch_size):
                    labels = model.assign([t for _, t in batch])
                    for (d, text), j in zip(batch, labels.tolist()):
                        outs[j].write(json.dumps({"text": text, "source": domains[d]},
                                                 ensure_ascii=False) + "\n")
                    prov = np.fromiter((d for d, _ in batch), dtype=np.int64, count=len(batch))
                    counts[split] += contingency(labels, prov, K, D)
                    size = np.fromiter((len(t.encode("utf-8")) for _, t in batch), dtype=np.float64,
                                       count=len(batch))
                    nbytes[split] += contingency(labels, prov, K, D, size)
                    bar.update(len(batch))
        if sum(int(c.sum()) for c in counts.values()) == 0:
            raise ValueError(f"{cfg.corpus}: no documents in splits {', '.join(cfg.splits)} "
                             f"(an empty corpus)")
        report = build_report(cfg, model.names, domains, counts, nbytes)
        atomic_write_json(tmp / "report.json", report)
        first = cfg.splits[0]
        heatmap_png(tmp / "heatmap.png", counts[first], model.names, domains,
                    f"{Path(cfg.clusters).name}: {first} documents by cluster and provenance")
        atomic_write_text(tmp / "report.md", f"# Cluster assignment ({first})\n\n"
                          + table(counts[first], model.names, domains) + "\n")
    return report


def build_report(cfg: AssignConfig, names, domains, counts: dict, nbytes: dict) -> dict:
    total, total_bytes = sum(counts.values()), sum(nbytes.values())
    labelled = len(domains) > 1
    report = {
        "format": REPORT_FORMAT, "version": 1, "clusters": list(names), "domains": list(domains),
        "corpus": str(Path(cfg.corpus).resolve()), "clusters_path": str(Path(cfg.clusters).resolve()),
        "sizes": dict(zip(names, total.sum(axis=1).tolist())),
        "splits": {s: {"sizes": dict(zip(names, c.sum(axis=1).tolist())),
                       "bytes": dict(zip(names, nbytes[s].sum(axis=1).tolist())),
                       "counts": c.tolist(), "byte_counts": nbytes[s].tolist(),
                       "purity": purity(c) if labelled and c.sum() else None,
                       "purity_bytes": purity(nbytes[s]) if labelled and c.sum() else None}
                   for s, c in counts.items()},
        "bytes": dict(zip(names, total_bytes.sum(axis=1).tolist())),
        "purity": purity(total) if labelled else None,
        "purity_bytes": purity(total_bytes) if labelled else None,
        "empty_splits": [f"{n}/{s}" for s, c in counts.items()
                         for n, row in zip(names, c) if row.sum() == 0]}
    return report
