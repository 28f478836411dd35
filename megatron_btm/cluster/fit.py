"""`btm cluster fit`: tf-idf -> TruncatedSVD -> L2 -> balanced k-means over a corpus, streamed.

Passes over the corpus (each reads the JSONL files again; nothing but what is listed is kept):
  1. count the documents (per domain) and their bytes;
  2. document frequencies of the words of a seeded sample of `sample_docs` documents (uniform;
     with balance="bytes", drawn with probability proportional to their bytes) -> the vocabulary (the `max_features` most frequent words with df >= `min_df`);
  3. word counts of the sample (sparse) -> idf (scikit-learn's TfidfTransformer) and the SVD
     components (TruncatedSVD, randomized, seeded);
  4. embed every document, `batch_size` at a time, into a float32 memmap [N, dim] on disk
     (beside the output, removed at the end);
  5. k-means++ on the sample's embeddings, then balanced Lloyd iterations over the memmap
     (`megatron_btm.cluster.kmeans`).
What is bounded: memory holds the sample's sparse counts and word set (bounded by
`sample_docs` documents), the [dim, V] components (V <= `max_features`), one batch of documents
and embeddings, and about 23 bytes a document (provenance, byte count, sample flag, the k-means
permutation and labels: 23 MB per million documents); the [N, dim] float32 embeddings live on
disk (400 MB per million documents at dim 100). Nothing grows with the corpus's text size.
"""
from __future__ import annotations

import sys
import tempfile
from array import array
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_btm.cluster import text as T
from megatron_btm.cluster.artefact import ClusterModel, check_cluster_names, default_names, save_clusters
from megatron_btm.cluster.features import Featurizer
from megatron_btm.cluster.kmeans import balanced_kmeans, kmeans_plus_plus
from megatron_btm.cluster.report import contingency, purity

MAX_K = 128
BALANCE = ("documents", "bytes")


@dataclass(kw_only=True)
class FitConfig:
    corpus: str
    """Corpus folder: <domain>/<split>.jsonl with a "text" field."""
    output: str
    """Clusters folder to write (clusters.json, vocabulary.json, arrays.npz)."""
    k: int
    """Number of clusters, 2..128."""
    domains: list[str] | None = None
    """Domains to read (their names are used only for the report); None = all."""
    split: str = "train"
    """Split the clusters are fitted on."""
    names: list[str] | None = None
    """Cluster names (valid domain names); None = <prefix>0 ... <prefix>{k-1}, zero-padded to
    the width of k-1 (cluster00 ... cluster15 for k=16)."""
    prefix: str = "cluster"
    """Prefix of the default cluster names."""
    dim: int = 100
    """SVD dimensions (c-BTM: 100); lowered to what the sample allows."""
    max_features: int = 32768
    """Vocabulary size at most."""
    min_df: int = 2
    """A word must occur in at least this many sampled documents."""
    sample_docs: int = 20000
    """Documents sampled for the vocabulary, idf, SVD and k-means++ initialisation."""
    batch_size: int = 4096
    """Documents per embedding batch and per balanced-assignment mini-batch."""
    balance: str = "documents"
    """What the balanced clusters hold equally: "documents" (c-BTM) or "bytes" of text (then
    the sample is drawn in proportion to bytes too)."""
    tolerance: float = 0.0
    """Balanced sizes of each mini-batch of B: in [floor(B/K(1-tol)), ceil(B/K(1+tol))]."""
    max_iter: int = 30
    """Balanced Lloyd iterations at most."""
    seed: int = 0
    progress: bool = True
    overwrite: bool = False
    skip_bad_lines: bool = False

    def __post_init__(self):
        if not isinstance(self.k, int) or not 2 <= self.k <= MAX_K:
            raise ValueError(f"k={self.k!r}: must be an integer from 2 to {MAX_K}")
        for key in ("dim", "max_features", "min_df", "sample_docs", "max_iter"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.batch_size < self.k:
            raise ValueError(f"batch_size={self.batch_size}: must be >= k={self.k}")
        if self.balance not in BALANCE:
            raise ValueError(f"balance={self.balance!r}: unknown; valid: {', '.join(BALANCE)}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"tolerance={self.tolerance}: must be in [0, 1]")
        if self.sample_docs < self.k:
            raise ValueError(f"sample_docs={self.sample_docs}: must be >= k={self.k}")
        self.names = check_cluster_names(list(self.names), self.k) if self.names is not None \
            else check_cluster_names(default_names(self.k, self.prefix), self.k)
        if Path(self.output).exists() and not self.overwrite:
            raise FileExistsError(f"{self.output}: already exists (pass --overwrite to replace it)")


def _bar(cfg: FitConfig, desc: str, total: int | None):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="doc", disable=not cfg.progress, file=sys.stderr,
                dynamic_ncols=True)


def _docs(cfg: FitConfig, files, desc: str, total: int | None):
    with _bar(cfg, desc, total) as bar:
        for item in T.iter_documents(files, skip_bad_lines=cfg.skip_bad_lines):
            bar.update(1)
            yield item


def _sampled_texts(cfg, files, sample_mask, desc):
    for n, (_, text) in enumerate(_docs(cfg, files, desc, len(sample_mask))):
        if sample_mask[n]:
            yield text


def fit_featurizer(cfg: FitConfig, files, sample_mask: np.ndarray, analyzer: T.Analyzer
                   ) -> tuple[Featurizer, np.ndarray]:
    """Vocabulary, idf and SVD from the sample; returns (featurizer, sample embeddings)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer
    df = Counter()
    for text in _sampled_texts(cfg, files, sample_mask, "vocabulary"):
        df.update(set(analyzer.tokens(text)))
    kept = sorted((w for w, c in df.items() if c >= cfg.min_df), key=lambda w: (-df[w], w))
    vocabulary = sorted(kept[:cfg.max_features])
    del df
    if len(vocabulary) < 2:
        raise ValueError(f"{cfg.corpus}: only {len(vocabulary)} words occur in >= min_df="
                         f"{cfg.min_df} sampled documents; need at least 2 (lower --min-df)")
    V = len(vocabulary)
    probe = Featurizer(analyzer=analyzer, vocabulary=vocabulary, idf=np.ones(V),
                       components=np.zeros((1, V), np.float32))
    counts = probe.counts_matrix(_sampled_texts(cfg, files, sample_mask, "tf-idf sample"))
    tfidf = TfidfTransformer().fit(counts)
    dim = min(cfg.dim, V - 1, counts.shape[0] - 1)
    svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=cfg.seed)
    svd.fit(tfidf.transform(counts))
    feat = Featurizer(analyzer=analyzer, vocabulary=vocabulary, idf=tfidf.idf_.astype(np.float64),
                      components=svd.components_.astype(np.float32))
    return feat, feat.embed_counts(counts)


def fit_clusters(cfg: FitConfig) -> ClusterModel:
    t0 = time.time()
    domains = T.resolve_domains(cfg.corpus, cfg.domains)
    files = T.split_files(cfg.corpus, domains, cfg.split)
    prov, size = array("h"), array("q")  # O(N) small numbers: 2 + 8 bytes a document
    for d, text in _docs(cfg, files, "count", None):
        prov.append(d)
        size.append(len(text.encode("utf-8")))
    provenance = np.frombuffer(prov, dtype=np.int16) if prov else np.zeros(0, np.int16)
    nbytes = np.asarray(size, dtype=np.float64)
    del size
    N = len(provenance)
    if N == 0:
        raise ValueError(f"{cfg.corpus}: no documents in the {cfg.split} split of "
                         f"{', '.join(domains)} (an empty corpus)")
    if cfg.k > N:
        raise ValueError(f"k={cfg.k}: more clusters than documents ({N} in {cfg.corpus}, "
                         f"split {cfg.split})")
    rng = np.random.default_rng(cfg.seed)
    sample_mask = np.zeros(N, dtype=bool)
    # the sample follows the balance unit: with "bytes", a document's chance grows with its
    # length, so the vocabulary and the SVD see the text mass, not just the many short documents
    p = nbytes / nbytes.sum() if cfg.balance == "bytes" and nbytes.sum() > 0 else None
    size = min(cfg.sample_docs, N if p is None else int(np.count_nonzero(p)))
    sample_mask[rng.choice(N, size=size, replace=False, p=p)] = True
    analyzer = T.Analyzer(stop_words=T.english_stop_words())
    feat, sample_emb = fit_featurizer(cfg, files, sample_mask, analyzer)
    init = kmeans_plus_plus(sample_emb, cfg.k, cfg.seed)
    del sample_emb
    out_parent = Path(cfg.output).resolve().parent
    out_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-cluster-fit-", dir=out_parent) as tmp:
        emb = np.lib.format.open_memmap(Path(tmp) / "emb.npy", mode="w+", dtype=np.float32,
                                        shape=(N, feat.dim))
        start = 0
        for batch in T.batched(_docs(cfg, files, "embed", N), cfg.batch_size):
            emb[start:start + len(batch)] = feat.embed([t for _, t in batch])
            start += len(batch)
        emb.flush()
        with _bar(cfg, "balanced k-means", None) as bar:
            bar.unit = "iter"

            def tick(it, changed):
                bar.update(1)
                bar.set_postfix(changed=changed)
            res = balanced_kmeans(emb, init, batch_size=cfg.batch_size, tolerance=cfg.tolerance,
                                  max_iter=cfg.max_iter, seed=cfg.seed, progress=tick,
                                  weight_N=nbytes if cfg.balance == "bytes" else None)
        del emb
    sizes = np.bincount(res.labels, minlength=cfg.k)
    meta = {
        "corpus": str(Path(cfg.corpus).resolve()), "domains": domains, "split": cfg.split,
        "num_documents": N, "documents_per_domain": dict(zip(domains, np.bincount(
            provenance, minlength=len(domains)).tolist())),
        "seed": cfg.seed, "sample_docs": int(sample_mask.sum()), "min_df": cfg.min_df,
        "max_features": cfg.max_features, "dim_requested": cfg.dim, "batch_size": cfg.batch_size,
        "balance": cfg.balance, "tolerance": cfg.tolerance, "iterations": res.iterations, "converged": res.converged,
        "changed_last_iteration": res.changed,
        "inertia": res.inertia, "balanced_sizes": dict(zip(cfg.names, sizes.tolist())),
        "balanced_bytes": dict(zip(cfg.names, np.bincount(res.labels, weights=nbytes,
                                                          minlength=cfg.k).astype(int).tolist())),
        "seconds": round(time.time() - t0, 2)}
    if len(domains) > 1:
        meta["balanced_purity"] = purity(contingency(res.labels, provenance, cfg.k, len(domains)))
    model = ClusterModel(featurizer=feat, centroids=res.centroids, names=cfg.names, meta=meta)
    save_clusters(cfg.output, model, overwrite=cfg.overwrite)
    return model
