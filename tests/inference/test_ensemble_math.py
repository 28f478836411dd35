"""Mixing and posterior math on random inputs against a slow float64 reference (no models)."""
import math

import pytest
import torch

from inference_helpers import slow_ensemble_nll
from megatron_btm.inference import ensemble


def _random_case(K=3, B=2, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, B, T, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 5:] = -100  # padding at the end of the second block
    prior = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    return logits, targets, prior / prior.sum()


def _reference(logits, targets, prior, **kw):
    lp = torch.log_softmax(logits, dim=-1)
    return torch.tensor([slow_ensemble_nll(lp[:, b], targets[b].tolist(), prior.tolist(), **kw)
                         for b in range(targets.shape[0])], dtype=torch.float64)


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("topk_token", [None, 1, 2])
def test_logits_and_ll_paths_match_slow_reference(update, topk_token):
    logits, targets, prior = _random_case()
    ref = _reference(logits, targets, prior, update=update, topk_token=topk_token)
    nll, ll_BTK = ensemble.ensemble_nll_from_logits(logits, targets, prior.log(), update=update,
                                                    topk_token=topk_token)
    torch.testing.assert_close(nll, ref, rtol=1e-9, atol=1e-9)
    valid = targets != -100
    nll2 = ensemble.ensemble_nll_from_ll(ll_BTK, valid, prior.log(), update=update,
                                         topk_token=topk_token)
    torch.testing.assert_close(nll2, ref, rtol=1e-9, atol=1e-9)


def test_fp32_logits_close_to_reference():
    logits, targets, prior = _random_case(seed=3)
    ref = _reference(logits, targets, prior)
    nll, _ = ensemble.ensemble_nll_from_logits(logits.float(), targets, prior.log())
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)


def test_topk_equal_to_n_is_the_full_ensemble():
    logits, targets, prior = _random_case(K=4, seed=1)
    full, ll = ensemble.ensemble_nll_from_logits(logits, targets, prior.log())
    valid = targets != -100
    tok, _ = ensemble.ensemble_nll_from_logits(logits, targets, prior.log(), topk_token=4)
    doc = ensemble.ensemble_nll_from_ll(ll, valid, ensemble.log_prior_of(prior, 4, topk=4))
    torch.testing.assert_close(tok, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(doc, full, rtol=0, atol=1e-12)
    rows = ensemble.evaluate_rows(ll, valid, ["a", "b", "c", "d"], prior_K=prior, topk=[4])
    for row in ("top4/doc", "top4/token"):
        assert rows[row]["nll"] == pytest.approx(rows["ensemble/cached"]["nll"], abs=1e-12)
    # and the top-k rows are not trivially equal for smaller k
    rows2 = ensemble.evaluate_rows(ll, valid, ["a", "b", "c", "d"], prior_K=prior, topk=[1])
    assert rows2["top1/doc"]["nll"] != pytest.approx(rows["ensemble/cached"]["nll"], abs=1e-6)


def test_top1_doc_with_one_hot_prior_is_that_expert():
    logits, targets, _ = _random_case(K=3, seed=2)
    _, ll = ensemble.ensemble_nll_from_logits(logits, targets, torch.zeros(3))
    valid = targets != -100
    prior = torch.tensor([0.05, 0.9, 0.05], dtype=torch.float64)
    rows = ensemble.evaluate_rows(ll, valid, ["a", "b", "c"], prior_K=prior, topk=[1])
    assert rows["top1/doc"]["nll"] == pytest.approx(rows["expert/b"]["nll"], abs=1e-12)
    manual = -float(torch.log_softmax(logits[1], -1).gather(-1, targets.clamp(min=0)[..., None])
                    .squeeze(-1)[valid].sum()) / int(valid.sum())
    assert rows["expert/b"]["nll"] == pytest.approx(manual, abs=1e-10)
    assert rows["expert/b"]["tokens"] == int(valid.sum()) == 2 * 7 - 2
    assert rows["expert/b"]["ppl"] == pytest.approx(math.exp(manual), rel=1e-10)


def test_single_expert_ensemble_is_the_expert():
    logits, targets, _ = _random_case(K=1, seed=4)
    nll, ll = ensemble.ensemble_nll_from_logits(logits, targets, torch.zeros(1))
    torch.testing.assert_close(nll, -ll[..., 0], rtol=0, atol=1e-12)


def test_rows_without_prior_and_bad_input():
    logits, targets, prior = _random_case(K=2)
    _, ll = ensemble.ensemble_nll_from_logits(logits, targets, prior.log())
    valid = targets != -100
    rows = ensemble.evaluate_rows(ll, valid, ["a", "b"], prior_K=None,
                                  modes=["uniform", "cached", "uniform-fixed"], topk=[1, 2, 3])
    assert set(rows) == {"expert/a", "expert/b", "ensemble/uniform", "ensemble/uniform-fixed",
                         "top1/token", "top2/token"}
    with pytest.raises(ValueError, match="unknown ensemble mode.*valid modes"):
        ensemble.evaluate_rows(ll, valid, ["a", "b"], modes=["bogus"])
    with pytest.raises(ValueError, match=r"expected 2 values.*got shape \(3,\)"):
        ensemble.log_prior_of(torch.ones(3) / 3, 2)
    with pytest.raises(ValueError, match="1 names for 2 experts"):
        ensemble.evaluate_rows(ll, valid, ["a"])


def test_window_and_decay_pass_through():
    logits, targets, prior = _random_case(T=9, seed=6)
    full, ll = ensemble.ensemble_nll_from_logits(logits, targets, prior.log())
    valid = targets != -100
    same = ensemble.ensemble_nll_from_ll(ll, valid, prior.log(), window=9)
    torch.testing.assert_close(same, full, rtol=0, atol=1e-12)
    # window=1: the posterior at t uses only token t-1 (the official BTM code's rule)
    w1 = ensemble.ensemble_nll_from_ll(ll, valid, prior.log(), window=1)
    lp = torch.log_softmax(logits, dim=-1)
    for b in range(2):
        for t in range(1, 9):
            if targets[b, t] < 0:
                continue
            prev = [float(lp[j, b, t - 1, targets[b, t - 1]]) if targets[b, t - 1] >= 0 else 0.0
                    for j in range(3)]
            w = torch.tensor([math.log(prior[j]) + prev[j] for j in range(3)], dtype=torch.float64)
            w = torch.softmax(w, 0)
            ref = -math.log(sum(float(w[j]) * math.exp(float(lp[j, b, t, targets[b, t]])) for j in range(3)))
            assert float(w1[b, t]) == pytest.approx(ref, abs=1e-9)
    assert not torch.allclose(w1, full)
