import pytest
import torch

from megatron_btm.routing.topk import topk_log_weights, topk_prior


def test_topk_prior_keeps_largest_and_renormalises():
    prior = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15], dtype=torch.float64)
    idx, w = topk_prior(prior, 2)
    assert idx.tolist() == [1, 3]
    torch.testing.assert_close(w, torch.tensor([0.4 / 0.7, 0.3 / 0.7], dtype=torch.float64))
    idx, w = topk_prior(prior, 5)
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_topk_log_weights_matches_independent_computation():
    g = torch.Generator().manual_seed(0)
    log_w = torch.log_softmax(torch.randn(2, 5, 6, generator=g, dtype=torch.float64), dim=-1)
    got = topk_log_weights(log_w, 3)
    for i in range(2):
        for t in range(5):
            row = log_w[i, t].exp()
            keep = sorted(range(6), key=lambda j: -row[j].item())[:3]
            for j in range(6):
                if j in keep:
                    expected = (row[j] / sum(row[m] for m in keep)).log()
                    torch.testing.assert_close(got[i, t, j], expected)
                else:
                    assert got[i, t, j] == float("-inf")


@pytest.mark.parametrize("k", [0, 7, -1])
def test_bad_k_names_k_and_n(k):
    with pytest.raises(ValueError, match=rf"k={k}.*n=6"):
        topk_log_weights(torch.zeros(3, 6), k)
    with pytest.raises(ValueError, match=rf"k={k}.*n=6"):
        topk_prior(torch.full((6,), 1 / 6), k)


def test_bad_prior():
    with pytest.raises(ValueError, match="prior_K"):
        topk_prior(torch.tensor([0.5, -0.1, 0.6]), 1)
