"""prefix_log_posterior / sequence_log_posterior against a slow float64 loop reference."""
import math

import pytest
import torch

from megatron_btm.routing.posterior import prefix_log_posterior, sequence_log_posterior


def slow_reference(ll, log_prior, window=None, decay=None):
    """Literal formula, element by element, in Python floats (float64)."""
    B, T, K = ll.shape
    out = torch.empty(B, T, K, dtype=torch.float64)
    for b in range(B):
        lp = log_prior[b] if log_prior.dim() == 2 else log_prior
        for t in range(T):
            scores = []
            for j in range(K):
                s = float(lp[j])
                for p in range(t):
                    if window is not None and p < t - window:
                        continue
                    w = 1.0 if decay is None else decay ** (t - 1 - p)
                    s += w * float(ll[b, p, j])
                scores.append(s)
            m = max(scores)
            lse = m + math.log(sum(math.exp(x - m) for x in scores))
            for j in range(K):
                out[b, t, j] = scores[j] - lse
    return out


def random_inputs(seed, B=3, T=9, K=4, per_row_prior=False):
    g = torch.Generator().manual_seed(seed)
    ll = -torch.rand(B, T, K, generator=g, dtype=torch.float64) * 6  # log-likelihoods in [-6, 0]
    shape = (B, K) if per_row_prior else (K,)
    log_prior = torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return ll, log_prior


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("opts", [{}, {"window": 1}, {"window": 3}, {"window": 50}, {"decay": 0.7},
                                  {"decay": 1.0}])
def test_matches_slow_reference(seed, opts):
    ll, log_prior = random_inputs(seed, per_row_prior=seed == 1)
    got = prefix_log_posterior(ll, log_prior, **opts)
    torch.testing.assert_close(got, slow_reference(ll, log_prior, **opts), rtol=0, atol=1e-10)


def test_float32_input_close_to_float64_reference():
    ll, log_prior = random_inputs(7, T=200)
    got = prefix_log_posterior(ll.float(), log_prior.float())
    assert got.dtype == torch.float32
    ref = prefix_log_posterior(ll, log_prior)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)


def test_first_position_is_normalised_prior():
    ll, _ = random_inputs(3)
    unnormalised = torch.tensor([0.5, 2.0, -1.0, 0.0], dtype=torch.float64)
    got = prefix_log_posterior(ll, unnormalised)
    expected = torch.log_softmax(unnormalised, dim=-1)
    for b in range(ll.shape[0]):
        torch.testing.assert_close(got[b, 0], expected)


def test_zero_loglik_positions_carry_no_evidence():
    ll, log_prior = random_inputs(4, B=1, T=6)
    padded = torch.cat([ll[:, :3], torch.zeros(1, 4, 4, dtype=ll.dtype), ll[:, 3:]], dim=1)
    a = prefix_log_posterior(ll, log_prior)
    b = prefix_log_posterior(padded, log_prior)
    # position t of the original = position t (t<=3) or t+4 (after the padding) of the padded one
    torch.testing.assert_close(b[:, :4], a[:, :4])
    torch.testing.assert_close(b[:, 7:], a[:, 3:])


def test_minus_inf_prior_excludes_expert():
    ll, _ = random_inputs(5)
    log_prior = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")], dtype=torch.float64)
    got = prefix_log_posterior(ll, log_prior)
    assert torch.isneginf(got[..., [1, 3]]).all()
    torch.testing.assert_close(got[..., [0, 2]].exp().sum(-1), torch.ones(3, 9, dtype=torch.float64))


def test_sequence_posterior_equals_posterior_after_last_token():
    ll, log_prior = random_inputs(6, T=8)
    # appending one zero-evidence position makes prefix_log_posterior's last entry the full posterior
    ext = torch.cat([ll, torch.zeros(3, 1, 4, dtype=ll.dtype)], dim=1)
    torch.testing.assert_close(sequence_log_posterior(ll, log_prior), prefix_log_posterior(ext, log_prior)[:, -1])
    lengths = torch.tensor([8, 3, 0])
    got = sequence_log_posterior(ll, log_prior, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[b], slow_reference(ext[b:b + 1, : n + 1], log_prior)[0, n])


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window=0"), ({"decay": 0.0}, "decay=0.0"), ({"decay": 1.5}, "decay=1.5"),
    ({"window": 2, "decay": 0.5}, "not both")])
def test_bad_options(kwargs, match):
    ll, log_prior = random_inputs(0)
    with pytest.raises(ValueError, match=match):
        prefix_log_posterior(ll, log_prior, **kwargs)


def test_bad_shapes():
    ll, log_prior = random_inputs(0)
    with pytest.raises(ValueError, match="log_prior: expected shape"):
        prefix_log_posterior(ll, log_prior[:3])
    with pytest.raises(ValueError, match="expert_ll_BTK: expected 3 dims"):
        prefix_log_posterior(ll[0], log_prior)
    with pytest.raises(ValueError, match="all -inf"):
        prefix_log_posterior(ll, torch.full((4,), float("-inf")))
    with pytest.raises(ValueError, match="lengths"):
        sequence_log_posterior(ll, log_prior, torch.tensor([1, 2, 99]))
