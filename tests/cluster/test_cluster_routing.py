"""Cluster routing: w_j ∝ exp(-||h - c_j||^2 / T), top-k; the incremental prefix embedding."""
import math

import numpy as np
import pytest
import torch

from megatron_btm.cluster.artefact import ClusterModel
from megatron_btm.cluster.features import Featurizer
from megatron_btm.cluster.text import Analyzer
from megatron_btm.data import jsonl
from megatron_btm.routing.cluster import ClusterRouter, cluster_log_weights, domain_branch_weights


def hand_router(temperature=0.1):
    """3 words, idf (1, 2, 1), dim 2 keeping 'apple' and 'banana'; unit centroids."""
    feat = Featurizer(analyzer=Analyzer(stop_words=frozenset({"the"})),
                      vocabulary=["apple", "banana", "cherry"], idf=np.array([1.0, 2.0, 1.0]),
                      components=np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
    model = ClusterModel(featurizer=feat, centroids=[[1, 0], [0, 1], [0.6, 0.8]],
                         names=["a", "b", "c"])
    return ClusterRouter(model, temperature)


def test_weights_match_the_formula_on_hand_computed_points():
    router = hand_router()
    text = "The apple, banana and BANANA; cherry!"
    # counts (1, 2, 1) * idf (1, 2, 1) = (1, 4, 1) -> projected (1, 4) -> h = (1, 4) / sqrt(17)
    np.testing.assert_allclose(router.embed(text), np.array([1, 4]) / math.sqrt(17), atol=1e-15)
    # unit h and unit centroids: d_j = ||h - c_j||^2 = 2 - 2 h.c_j
    d = [2 - 2 * c / math.sqrt(17) for c in (1.0, 4.0, 0.6 + 3.2)]
    e = [math.exp(-dj / 0.1) for dj in d]
    want = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
    torch.testing.assert_close(router.weights(text), want, rtol=1e-12, atol=0)
    # top-2 drops cluster a (the farthest) and renormalises b and c
    top2 = torch.tensor([0.0, e[1] / (e[1] + e[2]), e[2] / (e[1] + e[2])], dtype=torch.float64)
    torch.testing.assert_close(router.weights(text, topk=2), top2, rtol=1e-12, atol=0)
    assert router.weights(text, topk=1).tolist() == [0.0, 1.0, 0.0]
    # the temperature divides the distance once (c-BTM's code would square d first)
    hot = hand_router(temperature=1.0).weights(text)
    e1 = [math.exp(-dj) for dj in d]
    torch.testing.assert_close(hot, torch.tensor([v / sum(e1) for v in e1], dtype=torch.float64))


def test_prefix_without_known_words_uses_the_formula_on_the_zero_vector():
    router = hand_router()
    w = router.weights("nothing known here")
    e = [math.exp(-1.0 / 0.1)] * 3  # ||0 - c_j||^2 = 1 for unit centroids
    torch.testing.assert_close(w, torch.tensor([1 / 3] * 3, dtype=torch.float64))
    assert router.incremental().weights().tolist() == pytest.approx([v / sum(e) for v in e])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_embedding_equals_from_scratch(real_clusters, real_slice, seed):
    router = ClusterRouter.load(real_clusters)
    text = next(iter(jsonl.iter_texts(real_slice / "code_python" / "valid.jsonl")))[:3000]
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(text)), size=60, replace=False)).tolist()
    state, start = router.incremental(), 0
    for end in cuts + [len(text)]:
        state.append(text[start:end])  # pieces cut anywhere, mid-word included
        start = end
        assert np.array_equal(state.embedding(), router.embed(text[:end]))
    assert state.weights(topk=2).tolist() == router.weights(text, topk=2).tolist()
    assert np.linalg.norm(state.embedding()) == pytest.approx(1.0)


def test_domain_branch_weights_is_the_mean_of_document_weights(toy_clusters, toy_corpus):
    router = ClusterRouter.load(toy_clusters)
    docs = list(jsonl.iter_texts(toy_corpus / "cook" / "valid.jsonl"))
    w = domain_branch_weights(router, docs, topk=2, batch_size=3)
    torch.testing.assert_close(w, torch.stack([router.weights(t, topk=2) for t in docs]).mean(0))
    assert w.sum().item() == pytest.approx(1.0) and w.max().item() > 0.9


def test_bad_routing_arguments():
    with pytest.raises(ValueError, match="temperature=0"):
        hand_router(temperature=0)
    with pytest.raises(ValueError, match="k=4"):
        hand_router().weights("apple", topk=4)
    with pytest.raises(ValueError, match="no documents"):
        domain_branch_weights(hand_router(), [])
    with pytest.raises(ValueError, match="temperature=-1"):
        cluster_log_weights(torch.zeros(3), -1)
