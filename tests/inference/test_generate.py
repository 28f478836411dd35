"""Sampling from the ensemble / a single model: determinism, greedy limits, nucleus, vocab."""
import pytest
import torch

from inference_helpers import forward_logprobs
from megatron_btm.inference.generate import SamplingConfig, generate, sample_token


@pytest.fixture(scope="module")
def experts(world):
    from megatron_btm.inference.scoring import load_experts
    return load_experts([(f"e{j}", c) for j, c in enumerate(world.checkpoints)])


def _greedy_reference(world, prompt, steps, prior):
    """Greedy decoding of the mixture computed directly: posterior from explicit sums of the
    models' own log-probabilities, mixture = log Σ_j w_j p_j(v)."""
    tokens = list(prompt)
    score = torch.tensor(prior, dtype=torch.float64).log()
    for t in range(1, len(tokens)):
        for j, m in enumerate(world.models):
            score[j] += forward_logprobs(m, torch.tensor([tokens[:t]]), world.vocab)[0, -1, tokens[t]]
    out = []
    for _ in range(steps):
        lp_KV = torch.stack([forward_logprobs(m, torch.tensor([tokens[-16:]]), world.vocab)[0, -1]
                             for m in world.models])
        w = torch.log_softmax(score, 0)
        tok = int(torch.logsumexp(w[:, None] + lp_KV, dim=0).argmax())
        out.append(tok)
        tokens.append(tok)
        score += lp_KV[:, tok]
    return out


def test_temperature_zero_is_greedy_argmax_of_the_mixture(world, experts):
    prompt, prior = [5, 17, 42], [0.2, 0.3, 0.5]
    ref = _greedy_reference(world, prompt, 20, prior)
    got = generate(experts, prompt, SamplingConfig(max_new_tokens=20, temperature=0.0),
                   log_prior_K=torch.tensor(prior, dtype=torch.float64).log())
    assert got.tokens == ref
    # top-p so small only the most probable token survives: greedy again, at any temperature
    tiny_p = generate(experts, prompt, SamplingConfig(max_new_tokens=20, temperature=1.5, top_p=1e-9, seed=3),
                      log_prior_K=torch.tensor(prior, dtype=torch.float64).log())
    assert tiny_p.tokens == ref
    # the posterior moves with the text (20 > 16 tokens also exercises the sliding context)
    assert got.log_posterior[0] != pytest.approx(got.log_posterior[-1])


def test_sampling_is_deterministic_per_seed_and_in_vocab(world, experts):
    cfg = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=7)
    a = generate(experts, [3], cfg)
    b = generate(experts, [3], cfg)
    c = generate(experts, [3], SamplingConfig(max_new_tokens=24, temperature=1.0, seed=8))
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert len(a.tokens) == 24 and all(0 <= t < world.vocab for t in a.tokens + c.tokens)
    single = generate(experts[:1], [3], cfg)  # a single (e.g. averaged) model: K = 1
    assert all(0 <= t < world.vocab for t in single.tokens)
    assert single.log_posterior[0] == [0.0]


def test_stop_token_ends_generation(experts):
    greedy = generate(experts, [9], SamplingConfig(max_new_tokens=10, temperature=0.0))
    stop = greedy.tokens[3]
    first = greedy.tokens.index(stop)
    got = generate(experts, [9], SamplingConfig(max_new_tokens=10, temperature=0.0, stop_token=stop))
    assert got.tokens == greedy.tokens[:first + 1]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=1.0, top_p=0.75)  # needs {0, 1} (0.5 < 0.75 <= 0.8)
    draws = [sample_token(probs.log(), cfg, g) for _ in range(400)]
    assert set(draws) == {0, 1}
    frac0 = draws.count(0) / len(draws)
    assert abs(frac0 - 0.5 / 0.8) < 0.1  # renormalised within the nucleus
    cold = [sample_token(probs.log(), SamplingConfig(temperature=0.05), g) for _ in range(50)]
    assert set(cold) == {0}


@pytest.mark.parametrize("kw, match", [({"temperature": -1.0}, "temperature"),
                                       ({"top_p": 0.0}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens")])
def test_bad_sampling_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)


def test_bad_prompt(world, experts):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(experts, [world.vocab + 3], SamplingConfig(max_new_tokens=1))
    with pytest.raises(ValueError, match="prompt: empty"):
        generate(experts, [], SamplingConfig(max_new_tokens=1))
