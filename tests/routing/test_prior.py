import json

import pytest
import torch

from megatron_btm.routing.prior import ema_update, estimate_cached_prior, load_prior, save_prior


def test_ema_update_exact_convention():
    prior = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    post = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    got = ema_update(prior, post, 0.3)
    # (1 - 0.3) * prior + 0.3 * mean = 0.7*[.5,.25,.25] + 0.3*[.5,0,.5]
    torch.testing.assert_close(got, torch.tensor([0.5, 0.175, 0.325], dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha=0"):
        ema_update(prior, post, 0.0)


def manual_prior(batches, K, alpha, lengths=None):
    """Independent loop: posterior of each sequence under the current prior, in Python floats."""
    import math
    prior = [1.0 / K] * K
    for i, ll in enumerate(batches):
        posts = []
        for b in range(ll.shape[0]):
            n = ll.shape[1] if lengths is None else int(lengths[i][b])
            scores = [math.log(prior[j]) + float(ll[b, :n, j].sum()) for j in range(K)]
            m = max(scores)
            z = sum(math.exp(s - m) for s in scores)
            posts.append([math.exp(s - m) / z for s in scores])
        mean = [sum(p[j] for p in posts) / len(posts) for j in range(K)]
        prior = [(1 - alpha) * prior[j] + alpha * mean[j] for j in range(K)]
    return torch.tensor(prior, dtype=torch.float64)


def test_estimate_cached_prior_matches_manual_loop_and_order_matters():
    g = torch.Generator().manual_seed(0)
    # expert 2 fits this "domain" best: its log-likelihoods are higher
    batches = [-torch.rand(4, 5, 3, generator=g, dtype=torch.float64) * 3 + torch.tensor([0, 0, 0.4])
               for _ in range(6)]
    got = estimate_cached_prior(batches, 3, alpha=0.3)
    torch.testing.assert_close(got, manual_prior(batches, 3, 0.3), rtol=0, atol=1e-12)
    assert got.argmax() == 2
    lengths = [torch.randint(0, 6, (4,), generator=g) for _ in batches]
    torch.testing.assert_close(estimate_cached_prior(batches, 3, lengths=lengths),
                               manual_prior(batches, 3, 0.3, lengths), rtol=0, atol=1e-12)


def test_estimate_cached_prior_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        estimate_cached_prior([], 3)
    with pytest.raises(ValueError, match=r"expert_ll_batches\[0\]"):
        estimate_cached_prior([torch.zeros(2, 3, 4)], 3)
    with pytest.raises(ValueError, match="initial"):
        estimate_cached_prior([torch.zeros(2, 3, 3)], 3, initial=torch.tensor([1.0, -1.0, 1.0]))


def test_save_load_roundtrip_and_reorder(tmp_path):
    path = tmp_path / "prior.json"
    save_prior(path, torch.tensor([0.2, 0.5, 0.3]), ["a", "b", "c"], "novels", meta={"alpha": 0.3})
    prior, ids, meta = load_prior(path)
    assert ids == ["a", "b", "c"] and meta["alpha"] == 0.3 and meta["domain"] == "novels"
    torch.testing.assert_close(prior, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), atol=1e-7, rtol=0)
    prior, ids, _ = load_prior(path, expert_ids=["c", "a", "b"])
    assert ids == ["c", "a", "b"]
    torch.testing.assert_close(prior, torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64), atol=1e-7, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_load_prior_errors(tmp_path):
    path = tmp_path / "prior.json"
    save_prior(path, torch.tensor([0.5, 0.5]), ["a", "b"], "news")
    with pytest.raises(ValueError, match=r"missing from the prior \['c'\].*not in the forest \['b'\]"):
        load_prior(path, expert_ids=["a", "c"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_prior(tmp_path / "nope.json")
    data = json.loads(path.read_text())
    data["prior"] = [0.5, 0.6]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sums to"):
        load_prior(path)
    with pytest.raises(ValueError, match="duplicate"):
        save_prior(path, torch.tensor([0.5, 0.5]), ["a", "a"], "news")
