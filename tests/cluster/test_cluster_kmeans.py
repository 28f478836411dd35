"""Balanced assignment keeps every size in [lo, hi]; balanced k-means recovers blobs."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from megatron_btm.cluster.kmeans import (balanced_assign, balanced_assign_weighted,
                                         balanced_kmeans, kmeans_plus_plus, size_bounds,
                                         sq_distances)


def blobs(sizes, dim=5, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (len(sizes), dim))
    X = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centers, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


@pytest.mark.parametrize("n,k,tol", [(10, 4, 0.0), (97, 5, 0.0), (200, 8, 0.25), (50, 2, 1.0),
                                     (33, 32, 0.0)])
def test_balanced_assign_sizes_within_bounds(n, k, tol):
    rng = np.random.default_rng(n + k)
    # skewed distances: most points prefer cluster 0, so the bounds must bind
    d = rng.random((n, k)) + np.linspace(0, 1, k)[None]
    lo, hi = size_bounds(n, k, tol)
    labels = balanced_assign(d, lo, hi)
    sizes = np.bincount(labels, minlength=k)
    assert sizes.sum() == n and sizes.min() >= lo and sizes.max() <= hi
    if tol == 0.0:
        assert set(sizes.tolist()) <= {n // k, -(-n // k)}
        assert sizes.max() - sizes.min() <= 1


def test_balanced_assign_takes_nearest_when_free():
    d = np.array([[0.0, 5.0], [5.0, 0.0], [0.1, 3.0], [4.0, 0.2]])
    assert balanced_assign(d, 2, 2).tolist() == [0, 1, 0, 1]
    # all four prefer cluster 0: the two nearest get it, the others are moved
    d = np.array([[0.0, 1.0], [0.5, 1.0], [0.2, 1.0], [0.9, 1.0]])
    assert balanced_assign(d, 2, 2).tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_assign_reaches_the_optimal_assignment(seed):
    from scipy.optimize import linear_sum_assignment
    X, _ = blobs([120, 60, 40, 20], seed=seed)  # unequal blobs: the size limits bind hard
    C = np.random.default_rng(seed).normal(0, 3, (4, 5))
    d = sq_distances(X, C)
    labels = balanced_assign(d, 60, 60)
    assert np.bincount(labels, minlength=4).tolist() == [60] * 4
    slots = np.repeat(d, 60, axis=1)  # each cluster as 60 interchangeable slots
    rows, cols = linear_sum_assignment(slots)
    optimum = slots[rows, cols].sum()
    cost = d[np.arange(240), labels].sum()
    greedy = d[np.arange(240), balanced_assign(d, 60, 60, sweeps=0)].sum()
    assert cost <= optimum * (1 + 1e-9) + 1e-9
    assert greedy >= cost  # the prices matter: the greedy pass alone is not optimal here
    assert greedy > optimum * 1.001


def test_balanced_kmeans_recovers_blobs_and_respects_tolerance():
    X, y = blobs([150, 150, 150, 150])
    init = kmeans_plus_plus(X, 4, seed=0)
    res = balanced_kmeans(X, init, batch_size=len(X), tolerance=0.1, seed=0)
    assert adjusted_rand_score(y, res.labels) >= 0.95
    lo, hi = size_bounds(len(X), 4, 0.1)
    sizes = np.bincount(res.labels, minlength=4)
    assert sizes.min() >= lo and sizes.max() <= hi
    assert res.converged


def test_balanced_kmeans_mini_batches_balance_each_batch():
    # unequal blobs: exact balance (tol 0) must split the big blob rather than follow it
    X, y = blobs([300, 100, 100], seed=1)
    init = kmeans_plus_plus(X, 3, seed=0)
    res = balanced_kmeans(X, init, batch_size=128, tolerance=0.0, seed=3)
    sizes = np.bincount(res.labels, minlength=3)
    batches = [128, 128, 128, 116]  # the fixed batches of 500 points
    assert sizes.min() >= sum(b // 3 for b in batches)
    assert sizes.max() <= sum(-(-b // 3) for b in batches)
    # the two small blobs are still recovered as clusters of their own
    for blob in (1, 2):
        counts = np.bincount(res.labels[y == blob], minlength=3)
        assert counts.max() / counts.sum() >= 0.95


def test_sq_distances_matches_direct():
    rng = np.random.default_rng(0)
    X, C = rng.normal(size=(7, 3)), rng.normal(size=(4, 3))
    direct = ((X[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_allclose(sq_distances(X, C), direct, atol=1e-12)


def test_kmeans_rejects_bad_k():
    X = np.eye(3)
    with pytest.raises(ValueError, match="k=4"):
        balanced_kmeans(X, np.zeros((4, 3)))


def test_weighted_balance_bounds_loads():
    rng = np.random.default_rng(5)
    for n, k, tol in [(200, 4, 0.0), (301, 7, 0.1), (64, 8, 0.3)]:
        d = rng.random((n, k)) + np.linspace(0, 1, k)[None]
        w = rng.integers(1, 50, n).astype(float)
        labels = balanced_assign_weighted(d, w, tol)
        load = np.bincount(labels, weights=w, minlength=k)
        assert labels.min() >= 0 and load.sum() == w.sum()
        assert load.max() <= w.sum() / k * (1 + tol) + w.max()  # the stated guarantee
    # unit weights: the same bounds as balanced_assign
    d = rng.random((97, 5)) + np.linspace(0, 1, 5)[None]
    sizes = np.bincount(balanced_assign_weighted(d, np.ones(97), 0.0), minlength=5)
    assert sizes.min() >= 19 and sizes.max() <= 20


def test_balancing_bytes_keeps_a_blob_of_many_short_documents_whole():
    # blob 0: 300 short documents (weight 1); blob 1: 100 long ones (weight 3): equal bytes
    X, y = blobs([300, 100], seed=2)
    w = np.where(y == 0, 1.0, 3.0)
    init = kmeans_plus_plus(X, 2, seed=0)
    by_bytes = balanced_kmeans(X, init, batch_size=len(X), weight_N=w, seed=0)
    assert adjusted_rand_score(y, by_bytes.labels) >= 0.95
    by_docs = balanced_kmeans(X, init, batch_size=len(X), seed=0)  # 200/200: splits blob 0
    assert adjusted_rand_score(y, by_docs.labels) < 0.5
