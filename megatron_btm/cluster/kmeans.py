"""Balanced k-means (squared Euclidean), streamed over mini-batches of an array on disk.

Balancing algorithm: a greedy size-constrained assignment per mini-batch. All (point, cluster)
pairs of the batch are visited in order of increasing squared distance; a point takes the first
cluster that still has room, where "room" means: the cluster has fewer than `hi` points, and, if
the cluster already has its `lo`, the points still unassigned outnumber the places the other
clusters lack to reach `lo`. Every cluster of a batch of B points then ends with a size in
[lo, hi] = [floor(B/K (1 - tol)), ceil(B/K (1 + tol))] (tol = 0: every size is floor or ceil of
B/K, as in c-BTM), always: a cluster below `lo` never refuses a point, and a refused pair is
to a cluster that stays refused. Why greedy rather than c-BTM's auction algorithm or an exact
min-cost flow: it guarantees the bounds in one deterministic pass, costs O(BK log BK) with no
iterations to tune, and needs no solver dependency; within a mini-batch of thousands of points
its assignment cost is close to the optimum (most points get their nearest cluster; only the
points at the margin of a full cluster move), and the Lloyd iterations below correct the rest.

Fitting is Lloyd's algorithm with balanced assignment: each iteration streams the points in
fixed mini-batches (one seeded permutation), balances each batch against the current centroids,
and accumulates per-cluster sums; the new centroids are the means. It stops when no label
changes or after `max_iter` iterations. Memory: one batch of points and O(K dim) sums, plus
O(N) integers (the permutation and the labels); the points themselves stay on disk (memmap).
The sizes of the union of the batches are within the sums of the per-batch bounds.

Balancing by weight (`weight_N`, e.g. bytes of text per document) is an extension: c-BTM
balances the number of documents, which on a corpus whose documents differ in length by 100x
(dictionary entries vs source files) gives clusters of very unequal text; balancing bytes
gives every expert the same amount of training text. It is k-means over bytes (a document
counts as many times as it has bytes): the centroids are byte-weighted means too, otherwise
a cluster of a few long documents has its centroid pulled away by many short ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


def size_bounds(n: int, k: int, tolerance: float) -> tuple[int, int]:
    """[lo, hi] cluster sizes allowed for a batch of n points in k clusters."""
    lo = math.floor(n / k * (1.0 - tolerance) + 1e-9)
    hi = math.ceil(n / k * (1.0 + tolerance) - 1e-9)
    return max(lo, 0), max(hi, 1)


def sq_distances(X_ND: np.ndarray, C_KD: np.ndarray) -> np.ndarray:
    """[N, K] squared Euclidean distances (float64, clipped at 0 against rounding)."""
    X = np.asarray(X_ND, dtype=np.float64)
    C = np.asarray(C_KD, dtype=np.float64)
    d = (np.einsum("nd,nd->n", X, X)[:, None] - 2.0 * X @ C.T + np.einsum("kd,kd->k", C, C)[None])
    return np.maximum(d, 0.0)


def balanced_assign(dist_NK: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """[N] labels with every cluster's size in [lo, hi] (greedy; see the module docstring)."""
    N, K = dist_NK.shape
    if not (K * lo <= N <= K * hi):
        raise ValueError(f"balanced_assign: {N} points cannot fill {K} clusters of sizes "
                         f"[{lo}, {hi}]")
    order = np.argsort(dist_NK, axis=None, kind="stable")
    labels = np.full(N, -1, dtype=np.int64)
    sizes = [0] * K
    deficit = K * lo  # places still missing for every cluster to reach lo
    remaining = N
    for flat in order.tolist():
        i, j = divmod(flat, K)
        if labels[i] >= 0 or sizes[j] >= hi:
            continue
        if sizes[j] < lo:
            deficit -= 1
        elif remaining <= deficit:
            continue  # the unassigned points are all needed by clusters below lo
        labels[i] = j
        sizes[j] += 1
        remaining -= 1
        if remaining == 0:
            break
    assert remaining == 0, "balanced_assign: infeasible (a bug)"
    return labels


def balanced_assign_weighted(dist_NK: np.ndarray, weight_N: np.ndarray, tolerance: float
                             ) -> np.ndarray:
    """[N] labels balancing the clusters' total *weight* (e.g. bytes of text), greedily.

    The same pass as `balanced_assign` with loads in weight units and bounds
    [lo, hi] = [W/K (1 - tol), W/K (1 + tol)] (W: the batch's total weight): a pair is refused
    when the point would take its cluster above hi, or when the cluster is at or above lo and
    the weight still unassigned would no longer cover what the clusters below lo lack. With
    unequal weights the bounds can be infeasible (one document heavier than W/K), so a point
    every cluster refused goes to the least-loaded cluster: loads then exceed hi by at most
    one document's weight. The achieved loads are what the caller reports.
    """
    N, K = dist_NK.shape
    w = np.asarray(weight_N, dtype=np.float64)
    total = float(w.sum())
    lo, hi = total / K * (1.0 - tolerance), total / K * (1.0 + tolerance)
    order = np.argsort(dist_NK, axis=None, kind="stable")
    labels = np.full(N, -1, dtype=np.int64)
    load = [0.0] * K
    deficit = K * lo
    remaining = total
    left = N
    for flat in order.tolist():
        i, j = divmod(flat, K)
        wi = float(w[i])
        if labels[i] >= 0 or load[j] + wi > hi:
            continue
        fill = min(wi, max(lo - load[j], 0.0))  # what this point covers of j's deficit
        if remaining - wi < deficit - fill - 1e-9:
            continue  # the unassigned weight is needed by the clusters below lo
        deficit -= fill
        labels[i] = j
        load[j] += wi
        remaining -= wi
        left -= 1
        if left == 0:
            break
    for i in np.flatnonzero(labels < 0).tolist():  # refused everywhere: least-loaded cluster
        j = int(np.argmin(load))
        labels[i] = j
        load[j] += float(w[i])
    return labels


@dataclass
class KMeansResult:
    centroids: np.ndarray
    """[K, dim] float64"""
    labels: np.ndarray
    """[N] balanced labels of the last iteration"""
    iterations: int
    inertia: float
    """(weighted) sum of squared distances of the points to their (balanced) centroids"""
    converged: bool


def balanced_kmeans(X_ND: np.ndarray, init_KD: np.ndarray, *, batch_size: int = 4096,
                    tolerance: float = 0.0, max_iter: int = 30, seed: int = 0,
                    weight_N: np.ndarray | None = None,
                    progress: Callable | None = None) -> KMeansResult:
    """Balanced Lloyd iterations from `init_KD` over X (an array or a memmap), batch by batch.

    `weight_N` (optional, e.g. bytes per document): k-means of the weighted points, as if each
    point were repeated `weight` times: the clusters' total weight is balanced
    (`balanced_assign_weighted`), centroids are weighted means, inertia is weighted. `progress(iteration,
    changed_labels)` is called after each iteration (for a progress bar).
    """
    N = X_ND.shape[0]
    K = init_KD.shape[0]
    if not 2 <= K <= N:
        raise ValueError(f"k={K}: must be >= 2 and <= the number of points ({N})")
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance={tolerance}: must be in [0, 1]")
    if batch_size < K:
        raise ValueError(f"batch_size={batch_size}: must be >= k={K}")
    # fixed batches; a last batch smaller than K is merged into the one before
    perm = np.random.default_rng(seed).permutation(N)
    cuts = list(range(0, N, batch_size))[1:]
    if cuts and N - cuts[-1] < K:
        cuts.pop()
    batches = np.split(perm, cuts)
    centroids = np.asarray(init_KD, dtype=np.float64).copy()
    labels = np.full(N, -1, dtype=np.int32)
    converged, it, inertia = False, 0, 0.0
    for it in range(1, max_iter + 1):
        sums = np.zeros_like(centroids)
        counts = np.zeros(K, dtype=np.float64)  # points, or total weight
        changed, inertia = 0, 0.0
        for idx in batches:
            sorted_idx = np.sort(idx)  # sorted reads are sequential on a memmap
            X = np.asarray(X_ND[sorted_idx], dtype=np.float64)
            d = sq_distances(X, centroids)
            if weight_N is None:
                w = np.ones(len(idx))
                lab = balanced_assign(d, *size_bounds(len(idx), K, tolerance))
            else:
                w = np.asarray(weight_N[sorted_idx], dtype=np.float64)
                lab = balanced_assign_weighted(d, w, tolerance)
            inertia += float((w * d[np.arange(len(idx)), lab]).sum())
            changed += int((labels[sorted_idx] != lab).sum())
            labels[sorted_idx] = lab
            np.add.at(sums, lab, w[:, None] * X)
            counts += np.bincount(lab, weights=w, minlength=K)
        if progress is not None:
            progress(it, changed)
        if changed == 0:
            converged = True
            break
        nonempty = counts > 0  # an empty cluster (only possible with tolerance 1) keeps its centroid
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
    return KMeansResult(centroids=centroids, labels=labels, iterations=it, inertia=inertia,
                        converged=converged)


def kmeans_plus_plus(X_ND: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[k, dim] initial centroids by k-means++ (scikit-learn's), seeded."""
    from sklearn.cluster import kmeans_plusplus
    X = np.asarray(X_ND, dtype=np.float64)
    if len(np.unique(X, axis=0)) < k:
        raise ValueError(f"k={k}: the sample has fewer than {k} distinct embeddings "
                         f"(documents too short or too alike for {k} clusters)")
    centers, _ = kmeans_plusplus(X, k, random_state=seed)
    return centers
