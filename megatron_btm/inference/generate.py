"""Sampling from an ELMForest ensemble (posterior updated token by token) or from one model.

At each step every expert scores the current context; the next-token distribution is the
posterior-weighted mixture `ops.mix_logprobs(logits_K1V, log_w_1K)`; the sampled token's
per-expert log-likelihoods then update the posterior (Bayes rule over the whole generated
prefix, prompt included). A single (e.g. parameter-averaged) model is the K = 1 case.

No KV cache: each step re-runs the (last seq_length tokens of the) context through every
expert. That is O(steps · seq_length) per expert — fine for the small models and short outputs
this is used for; a KV cache would be an optimisation behind the same function.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(log p / temperature), then
nucleus (top-p) filtering: keep the smallest set of most probable tokens whose mass reaches
top_p (the most probable token is always kept). A torch.Generator seeded with `seed` drives
every draw, so a seed gives the same text on every run and every TP rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(kw_only=True)
class SamplingConfig:
    """How tokens are drawn."""

    max_new_tokens: int = 64
    """Tokens to generate (fewer if `stop_token` is drawn)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy argmax."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 = no filtering."""
    seed: int = 0
    """Seed of the sampling generator."""
    stop_token: int | None = None
    """Stop after drawing this id (e.g. the tokenizer's eod); None = never stop early."""

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 0")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")


def sample_token(logprobs_V: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Draw one id from a log-distribution [V] with temperature and top-p."""
    if cfg.temperature == 0.0:
        return int(torch.argmax(logprobs_V))
    scaled_V = torch.log_softmax(logprobs_V.double() / cfg.temperature, dim=-1)
    probs_V = scaled_V.exp()
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs_V, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=0) - sorted_p
        keep = mass_before < cfg.top_p  # the first token has mass_before 0: always kept
        probs_V = torch.zeros_like(probs_V).index_copy(0, order, torch.where(keep, sorted_p, 0.0))
    return int(torch.multinomial(probs_V / probs_V.sum(), 1, generator=generator))


@dataclass
class GenerationResult:
    tokens: list[int]
    """The generated ids (prompt excluded)."""
    log_posterior: list[list[float]]
    """Log domain posterior used for each generated token (before seeing it), [steps][K]."""


@torch.no_grad()
def generate(experts: Sequence, prompt_ids: Sequence[int], cfg: SamplingConfig, *,
             log_prior_K: torch.Tensor | None = None, update: bool = True) -> GenerationResult:
    """Sample a continuation of `prompt_ids` from the ensemble of `experts` (scoring.Expert or
    anything with .full_logits(inputs_BT), .seq_length, .vocab_size).

    log_prior_K: [K] log prior (None = uniform). update=False keeps the weights at the prior.
    """
    from megatron_btm.ops import mix_logprobs
    K = len(experts)
    if K == 0:
        raise ValueError("experts: empty; need at least one model to generate from")
    if not prompt_ids:
        raise ValueError("prompt: empty; give at least one token (e.g. the eod id to start a document)")
    vocab = experts[0].vocab_size
    if any(e.vocab_size != vocab for e in experts):
        raise ValueError(f"experts have different vocab sizes {[e.vocab_size for e in experts]}")
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"prompt: token id {bad[0]} outside the vocabulary [0, {vocab})")
    context = min(e.seq_length for e in experts)
    if log_prior_K is None:
        log_prior_K = torch.full((K,), -torch.log(torch.tensor(float(K))).item(), dtype=torch.float64)
    score_K = log_prior_K.double().clone()
    if score_K.shape != (K,):
        raise ValueError(f"log_prior: expected {K} values, got shape {tuple(score_K.shape)}")
    tokens = [int(t) for t in prompt_ids]

    def next_logits_K1V() -> torch.Tensor:
        window_1T = torch.tensor([tokens[-context:]], dtype=torch.long)
        return torch.stack([e.full_logits(window_1T)[:, -1] for e in experts])  # [K, 1, V]

    # The prompt's tokens are evidence too: score each (after the first) under every expert,
    # in chunks of `context` predictions (as evaluation blocks are cut).
    if update and len(tokens) > 1:
        for start in range(0, len(tokens) - 1, context):
            window = tokens[start:start + context + 1]
            ids_1T = torch.tensor([window[:-1]], dtype=torch.long)
            for j, e in enumerate(experts):
                lp_TV = torch.log_softmax(e.full_logits(ids_1T)[0].double(), dim=-1).cpu()
                score_K[j] += lp_TV.gather(-1, torch.tensor(window[1:]).unsqueeze(-1)).sum()
    generator = torch.Generator().manual_seed(cfg.seed)
    out: list[int] = []
    posteriors: list[list[float]] = []
    for _ in range(cfg.max_new_tokens):
        log_w_K = score_K - torch.logsumexp(score_K, dim=0)
        logits_K1V = next_logits_K1V()
        mixed_V = mix_logprobs(logits_K1V.double(), log_w_K.unsqueeze(0).to(logits_K1V.device))[0].cpu()
        tok = sample_token(mixed_V, cfg, generator)
        posteriors.append(log_w_K.tolist())
        out.append(tok)
        tokens.append(tok)
        if update:
            score_K += torch.log_softmax(logits_K1V[:, 0].double(), dim=-1)[:, tok].cpu()
        if cfg.stop_token is not None and tok == cfg.stop_token:
            break
    return GenerationResult(tokens=out, log_posterior=posteriors)
