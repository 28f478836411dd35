"""KV cache (serving.kv through Megatron's StaticInferenceContext): greedy text identical, token
for token, to the no-cache path; batched prompts of different lengths; the fused op's dtype."""
import pytest
import torch

from megatron_btm.inference.generate import SamplingConfig, generate, generate_batch

PROMPTS = [[5, 17, 42], [7], [3, 1, 4, 1, 5, 9]]


@pytest.fixture(scope="module")
def experts(world):
    from megatron_btm.inference.scoring import load_experts
    return load_experts([(f"e{j}", c) for j, c in enumerate(world.checkpoints)])


def _uncached(experts, prompt, cfg, prior=None):
    return generate(experts, prompt, cfg, log_prior_K=prior, kv_cache=False)


@pytest.mark.parametrize("which", ["single", "ensemble"])
def test_cached_greedy_equals_uncached_b1(experts, which):
    models = experts[:1] if which == "single" else experts
    prior = None if which == "single" else torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0)  # 3 + 10 < seq_length 16: all cached
    ref = _uncached(models, PROMPTS[0], cfg, prior)
    got = generate(models, PROMPTS[0], cfg, log_prior_K=prior)
    assert got.tokens == ref.tokens and len(got.tokens) == 10
    torch.testing.assert_close(torch.tensor(got.log_posterior), torch.tensor(ref.log_posterior),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["single", "ensemble"])
def test_cached_batch_of_different_lengths_equals_each_alone(experts, which):
    models = experts[:1] if which == "single" else experts
    cfg = SamplingConfig(max_new_tokens=9, temperature=0.0)
    batch = generate_batch(models, PROMPTS, cfg)
    for prompt, got in zip(PROMPTS, batch):
        ref = _uncached(models, prompt, cfg)
        assert got.tokens == ref.tokens and len(got.tokens) == 9
    # sampling too: each row draws from its own seeded generator
    hot = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=5)
    rows = generate_batch(models, PROMPTS, hot)
    assert [r.tokens for r in rows] == [_uncached(models, p, hot).tokens for p in PROMPTS]


def test_past_the_context_the_cache_falls_back_to_the_window(experts):
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0)  # 3 + 20 > seq_length 16
    assert generate(experts, PROMPTS[0], cfg).tokens == _uncached(experts, PROMPTS[0], cfg).tokens


def test_kv_decoder_matches_full_forward(experts):
    from megatron_btm.serving.kv import KVDecoder
    e = experts[1]
    ids = torch.tensor([[5, 17, 42, 8, 9, 10], [1, 2, 3, 4, 5, 6]])
    full = e.full_logits(ids)
    dec = KVDecoder(e, 2, 8)
    steps = [dec.prefill(ids[:, :3])] + [dec.step(ids[:, t]).unsqueeze(1) for t in range(3, 6)]
    assert torch.cat(steps, 1).dtype == full.dtype
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="KV cache full"):
        dec.step(ids[:, 0]), dec.step(ids[:, 0]), dec.step(ids[:, 0])


def test_the_fused_op_mixes_the_experts_own_logits(world, experts, monkeypatch):
    """The mixture is ops.mix_logprobs on the experts' logits as they come (fp32 here: no fp64
    round trip), for the K active experts at once."""
    import megatron_btm.ops as ops
    from megatron_btm.inference import generate as gen
    seen = []
    real = ops.mix_logprobs

    def spy(logits, log_w, tp_group=None):
        seen.append((logits.dtype, tuple(logits.shape), log_w.dtype))
        return real(logits, log_w, tp_group)
    monkeypatch.setattr(ops, "mix_logprobs", spy)
    out = gen.generate_batch(experts[:2], PROMPTS[:2], SamplingConfig(max_new_tokens=4, temperature=0.0))
    assert all(len(r.tokens) == 4 for r in out)
    assert seen and set(seen) == {(torch.float32, (2, 2, world.vocab), torch.float32)}


def test_kv_cache_with_rope_gqa_matches_full_forward(world):
    """Llama-family fields (RoPE, RMSNorm, SwiGLU, grouped-query attention) through the cache."""
    from pathlib import Path

    from inference_helpers import build_pico
    from megatron_btm.inference.scoring import Expert
    from megatron_btm.megatron.model import GPTConfig
    from megatron_btm.serving.kv import KVDecoder
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                    seq_length=16, vocab_size=world.vocab, init_method_std=0.4, init_seed=5, arch="llama")
    e = Expert(name="llama", model=build_pico(cfg), config=cfg, checkpoint=Path("."))
    ids = torch.tensor([[5, 17, 42, 8, 9, 10, 11]])
    dec = KVDecoder(e, 1, 10)
    steps = [dec.prefill(ids[:, :2])] + [dec.step(ids[:, t]).unsqueeze(1) for t in range(2, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), e.full_logits(ids), atol=1e-4, rtol=1e-4)
    cfg0 = SamplingConfig(max_new_tokens=8, temperature=0.0)
    assert generate([e], [3, 4], cfg0).tokens == generate([e], [3, 4], cfg0, kv_cache=False).tokens
