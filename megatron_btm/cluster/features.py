"""Document embedding: tf-idf -> SVD projection -> L2 normalisation (c-BTM), in numpy.

    e(x) = normalise( (counts(x) * idf) @ components.T )          counts(x): [V] word counts

scikit-learn's pipeline (TfidfTransformer with its L2 row norm, then TruncatedSVD.transform,
then L2) gives the same vector: the tf-idf row norm is a positive scale that the final L2
normalisation removes. A document with no vocabulary word embeds to the zero vector.

Because e(x) depends on x only through the count vector, a prefix's embedding can be kept up to
date by adding the counts of the words that arrive (`megatron_btm.routing.cluster`). Loading and
embedding need numpy and scipy only (no scikit-learn, no pickle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from megatron_btm.cluster.text import Analyzer


@dataclass(kw_only=True)
class Featurizer:
    analyzer: Analyzer
    vocabulary: list[str]
    """Word of each column (index = column)."""
    idf: np.ndarray
    """[V] float64 inverse document frequencies (scikit-learn's smooth idf)."""
    components: np.ndarray
    """[dim, V] float32 right singular vectors of the tf-idf sample (TruncatedSVD.components_)."""

    def __post_init__(self):
        V = len(self.vocabulary)
        if self.idf.shape != (V,) or self.components.ndim != 2 or self.components.shape[1] != V:
            raise ValueError(f"featurizer: vocabulary of {V} words, idf {self.idf.shape}, "
                             f"components {self.components.shape}: shapes disagree")
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        if len(self.index) != V:
            raise ValueError("featurizer: the vocabulary has duplicate words")
        # [V, dim]: idf folded into the projection, float64 so sums do not depend on batching
        self.projection = (self.idf[:, None] * self.components.T.astype(np.float64))

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def word_ids(self, text: str) -> list[int]:
        """Vocabulary ids of the words of `text` (out-of-vocabulary words dropped)."""
        index = self.index
        return [i for i in map(index.get, self.analyzer.tokens(text)) if i is not None]

    def counts_matrix(self, texts: Iterable[str]) -> sp.csr_matrix:
        """[n, V] word counts (float64 CSR) of each text."""
        indptr, indices, data = [0], [], []
        for text in texts:
            ids, counts = np.unique(np.asarray(self.word_ids(text), dtype=np.int64),
                                    return_counts=True)
            indices.append(ids)
            data.append(counts)
            indptr.append(indptr[-1] + len(ids))
        n = len(indptr) - 1
        cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
        return sp.csr_matrix((cat(data, np.float64), cat(indices, np.int64), np.asarray(indptr)),
                             shape=(n, len(self.vocabulary)))

    def embed_counts(self, counts: sp.spmatrix | np.ndarray) -> np.ndarray:
        """[n, dim] float64 L2-normalised embeddings of [n, V] count rows."""
        X = np.asarray(counts @ self.projection, dtype=np.float64)
        return normalise_rows(X)

    def embed_count_dict(self, counts: Mapping[int, int]) -> np.ndarray:
        """[dim] embedding of a {word id: count} mapping (the incremental prefix state)."""
        if not counts:
            return np.zeros(self.dim)
        ids = np.fromiter(sorted(counts), dtype=np.int64, count=len(counts))
        vals = np.asarray([counts[i] for i in ids.tolist()], dtype=np.float64)
        row = sp.csr_matrix((vals, ids, np.asarray([0, len(ids)])), shape=(1, len(self.vocabulary)))
        return self.embed_counts(row)[0]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[n, dim] embeddings of `texts`."""
        return self.embed_counts(self.counts_matrix(texts))


def normalise_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    return X / np.where(norms > 0, norms, 1.0)[:, None]
