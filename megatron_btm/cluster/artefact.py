"""The saved clusters: a folder that loads without executing code (no pickle).

    CLUSTERS/clusters.json    {"format": "btm-clusters", "version": 1, names, analyzer (incl.
                              stop words), dim, vocabulary_size, fit settings and statistics,
                              sha256 of the two files below}
    CLUSTERS/vocabulary.json  ["word", ...]: the word of each tf-idf column
    CLUSTERS/arrays.npz       idf [V] float64, components [dim, V] float32, centroids [K, dim]
                              float64; read with np.load(allow_pickle=False)

The folder is written atomically (built under a .tmp- name, renamed when complete).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_btm.cluster.features import Featurizer
from megatron_btm.cluster.kmeans import sq_distances
from megatron_btm.cluster.text import Analyzer
from megatron_btm.forest.names import check_name
from megatron_btm.utils.io import atomic_dir, atomic_write_bytes, atomic_write_json, read_json, sha256_file

CLUSTERS_FORMAT = "btm-clusters"
CLUSTERS_VERSION = 1
META_FILE, VOCAB_FILE, ARRAYS_FILE = "clusters.json", "vocabulary.json", "arrays.npz"


def check_cluster_names(names: list[str], k: int) -> list[str]:
    """K distinct names, each a valid domain name (they become corpus folders and domains)."""
    if len(names) != k:
        raise ValueError(f"cluster names: {len(names)} given for k={k} clusters")
    for n in names:
        check_name(n, "cluster name")
    if len(set(names)) != len(names):
        raise ValueError(f"cluster names {names}: duplicates")
    return list(names)


def default_names(k: int, prefix: str = "cluster") -> list[str]:
    width = len(str(k - 1))
    return [f"{prefix}{j:0{width}d}" for j in range(k)]


@dataclass(kw_only=True)
class ClusterModel:
    featurizer: Featurizer
    centroids: np.ndarray
    """[K, dim] float64"""
    names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    """how it was fitted (corpus, seed, sizes, ...): informational"""

    def __post_init__(self):
        self.centroids = np.asarray(self.centroids, dtype=np.float64)
        if self.centroids.ndim != 2 or self.centroids.shape[1] != self.featurizer.dim:
            raise ValueError(f"centroids {self.centroids.shape}: expected [k, {self.featurizer.dim}]")
        check_cluster_names(self.names, self.k)

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def distances(self, emb_ND: np.ndarray) -> np.ndarray:
        """[N, K] squared Euclidean distances of embeddings to the centroids."""
        return sq_distances(emb_ND, self.centroids)

    def assign(self, texts: list[str]) -> np.ndarray:
        """[N] index of each text's nearest centroid (ties: the lowest index)."""
        return self.distances(self.featurizer.embed(texts)).argmin(axis=1)


def save_clusters(path: str | os.PathLike, model: ClusterModel, *, overwrite: bool = False) -> None:
    f = model.featurizer
    buf = io.BytesIO()
    np.savez(buf, idf=f.idf.astype(np.float64), components=f.components.astype(np.float32),
             centroids=model.centroids)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        atomic_write_bytes(tmp / ARRAYS_FILE, buf.getvalue())
        atomic_write_bytes(tmp / VOCAB_FILE, json.dumps(f.vocabulary, ensure_ascii=False).encode())
        atomic_write_json(tmp / META_FILE, {
            "format": CLUSTERS_FORMAT, "version": CLUSTERS_VERSION, "names": model.names,
            "k": model.k, "dim": f.dim, "vocabulary_size": len(f.vocabulary),
            "analyzer": f.analyzer.to_json(), "meta": model.meta,
            "sha256": {n: sha256_file(tmp / n) for n in (VOCAB_FILE, ARRAYS_FILE)}})


def load_clusters(path: str | os.PathLike) -> ClusterModel:
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a clusters folder (no {META_FILE}; "
                                f"make one with `btm cluster fit`)")
    data = read_json(meta_path)
    where = str(meta_path)
    if not isinstance(data, dict) or data.get("format") != CLUSTERS_FORMAT:
        raise ValueError(f"{where}: not a clusters file (expected \"format\": \"{CLUSTERS_FORMAT}\")")
    if data.get("version") != CLUSTERS_VERSION:
        raise ValueError(f"{where}: format version {data.get('version')!r}, this code reads version "
                         f"{CLUSTERS_VERSION} (refit with `btm cluster fit`)")
    for name in (VOCAB_FILE, ARRAYS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: file not found (incomplete clusters folder)")
        want = (data.get("sha256") or {}).get(name)
        if want != sha256_file(path / name):
            raise ValueError(f"{path / name}: checksum differs from {META_FILE} (corrupt or edited)")
    vocabulary = read_json(path / VOCAB_FILE)
    if not isinstance(vocabulary, list) or not all(isinstance(w, str) for w in vocabulary):
        raise ValueError(f"{path / VOCAB_FILE}: must be a JSON list of strings")
    with np.load(path / ARRAYS_FILE, allow_pickle=False) as z:
        missing = {"idf", "components", "centroids"} - set(z.files)
        if missing:
            raise ValueError(f"{path / ARRAYS_FILE}: arrays {sorted(missing)} missing")
        idf, components, centroids = z["idf"], z["components"], z["centroids"]
    analyzer = Analyzer.from_json(data.get("analyzer") or {}, where)
    names = data.get("names")
    if not isinstance(names, list):
        raise ValueError(f"{where}: key 'names' missing or not a list")
    featurizer = Featurizer(analyzer=analyzer, vocabulary=vocabulary, idf=idf, components=components)
    return ClusterModel(featurizer=featurizer, centroids=centroids, names=names,
                        meta=dict(data.get("meta") or {}))
