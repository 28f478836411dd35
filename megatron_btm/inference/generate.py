"""Sampling from an ELMForest ensemble (posterior updated token by token) or from one model.

At each step every given expert scores the next position; the next-token distribution is the
posterior-weighted mixture `ops.mix_logprobs(logits_KBV, log_w_BK)` and the chosen token's
per-expert log-likelihoods (`ops.mix_nll`'s second output) update the posterior (Bayes rule over
the whole prefix, prompt included). Both run on the experts' own device and dtype (fp32
accumulation); only the [B, K] posterior scores are kept in float64. A single (e.g.
parameter-averaged) model is the K = 1 case. Serving (serving/) routes first and passes only
the k chosen experts here.

KV cache (default): each expert keeps Megatron's static inference context (serving.kv), so a
step costs one position per expert. Prompts of a batch may differ in length: they are
left-aligned, the shortest is prefilled, and a longer prompt's own ids are fed at the positions
it still covers (as Megatron's static engine does), so each row is exactly its B = 1 result.
Past the model's seq_length (its positions), and with kv_cache=False, each step re-runs the
last seq_length ids through every expert (the sliding window): token for token the same text.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(log p / temperature), then
nucleus (top-p) filtering: keep the smallest set of most probable tokens whose mass reaches
top_p (the most probable token is always kept). A torch.Generator seeded with `seed` drives
every draw, so a seed gives the same text on every run and every TP rank.

Cluster routing (`cluster=routing.cluster_tokens.ClusterRouting`, c-BTM): the weights of each
step are the cluster router's for the text so far (prompt included), from the prefix embedding
updated token by token; no posterior is computed.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
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


def check_prompt(prompt_ids: Sequence[int], vocab: int, where: str = "prompt") -> list[int]:
    """The prompt as a list of ints; one-line errors for an empty prompt or ids outside [0, vocab)."""
    from megatron_btm.errors import TokenizerError
    if not len(prompt_ids):
        raise ValueError(f"{where}: empty; give at least one token (e.g. the eod id to start a document)")
    bad = [int(t) for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise TokenizerError(f"{where}: token id {bad[0]} outside the vocabulary [0, {vocab}) of "
                             "the models (another tokenizer?)")
    return [int(t) for t in prompt_ids]


class _ExpertLogits:
    """Next-position logits [K, B, V] of K experts: KV cache while it has room, else the window."""

    def __init__(self, experts: Sequence, batch: int, total: int, first: int, kv_cache: bool):
        from megatron_btm.serving.kv import KVDecoder
        self.experts = experts
        self.context = min(e.seq_length for e in experts)
        use_kv = kv_cache and first <= self.context
        self.caches = [KVDecoder(e, batch, min(total, self.context)) for e in experts] if use_kv else None

    def _window(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return torch.stack([e.full_logits(ids_BT[:, -self.context:])[:, -1] for e in self.experts])

    def prefill(self, ids_BT: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """(evidence chunks [(logits [K, B, t, V], targets [B, t])], last logits [K, B, V])."""
        T = ids_BT.shape[1]
        if self.caches is not None:
            logits_KBTV = torch.stack([c.prefill(ids_BT) for c in self.caches])
            return [(logits_KBTV[:, :, :-1], ids_BT[:, 1:])], logits_KBTV[:, :, -1]
        chunks = []  # prompts longer than the context: scored in blocks of `context` predictions
        for start in range(0, T - 1, self.context):
            window = ids_BT[:, start:start + self.context + 1]
            chunks.append((torch.stack([e.full_logits(window[:, :-1]) for e in self.experts]),
                           window[:, 1:]))
        return chunks, self._window(ids_BT)

    def step(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Logits after the last column of `ids_BT` (all ids so far) was appended."""
        if self.caches is not None and self.caches[0].length < self.caches[0].max_len:
            return torch.stack([c.step(ids_BT[:, -1]) for c in self.caches])
        self.caches = None  # positions exhausted: the sliding window from here on
        return self._window(ids_BT)


def _token_ll(logits_KNV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """[K, N] per-expert log-likelihoods of the targets (ops.mix_nll's second output), float64 CPU."""
    from megatron_btm.ops import mix_nll
    K, N, _ = logits_KNV.shape
    zero_NK = torch.zeros(N, K, dtype=torch.float32, device=logits_KNV.device)
    _, ll_KN = mix_nll(logits_KNV, zero_NK, targets_N.to(logits_KNV.device))
    return ll_KN.double().cpu()


@torch.no_grad()
def generate(experts: Sequence, prompt_ids: Sequence[int], cfg: SamplingConfig, *,
             log_prior_K: torch.Tensor | None = None, update: bool = True,
             kv_cache: bool = True, cluster=None) -> GenerationResult:
    """Sample a continuation of `prompt_ids` from the ensemble of `experts` (scoring.Expert or
    anything with .full_logits(inputs_BT), .model, .seq_length, .vocab_size).

    log_prior_K: [K] log prior (None = uniform). update=False keeps the weights at the prior.
    cluster: a ClusterRouting (weights in the experts' order) instead of the posterior.
    """
    return generate_batch(experts, [prompt_ids], cfg, log_prior=log_prior_K, update=update,
                          kv_cache=kv_cache, cluster=cluster)[0]


@torch.no_grad()
def generate_batch(experts: Sequence, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
                   log_prior: torch.Tensor | None = None, update: bool = True,
                   kv_cache: bool = True, cluster=None) -> list[GenerationResult]:
    """`generate` for B prompts at once (any lengths); log_prior [K] or [B, K]. Row b is the
    result `generate` gives for prompts[b] alone (each row draws from its own seeded generator)."""
    from megatron_btm.ops import mix_logprobs
    K, B = len(experts), len(prompts)
    if K == 0:
        raise ValueError("experts: empty; need at least one model to generate from")
    if B == 0:
        raise ValueError("prompts: empty; give at least one prompt")
    vocab = experts[0].vocab_size
    if any(e.vocab_size != vocab for e in experts):
        raise ValueError(f"experts have different vocab sizes {[e.vocab_size for e in experts]}")
    rows = [check_prompt(p, vocab, "prompt" if B == 1 else f"prompt {b}") for b, p in enumerate(prompts)]
    if log_prior is None:
        log_prior = torch.full((K,), -math.log(K), dtype=torch.float64)
    if log_prior.shape not in ((K,), (B, K)):
        raise ValueError(f"log_prior: expected {K} values (or [{B}, {K}]), got shape {tuple(log_prior.shape)}")
    score_BK = log_prior.double().cpu().expand(B, K).clone()
    lengths = [len(r) for r in rows]
    first = min(lengths)
    total = max(lengths) + cfg.max_new_tokens
    ids_BT = torch.tensor([r[:first] for r in rows], dtype=torch.long)
    source = _ExpertLogits(experts, B, total, first, kv_cache)
    chunks, last_KBV = source.prefill(ids_BT)
    update = update and K > 1 and cluster is None  # one model: its posterior is 1 whatever the text
    if cluster is not None:
        if cluster.router.num_clusters != K:
            raise ValueError(f"cluster routing over {cluster.router.num_clusters} clusters for {K} experts")
        cluster.start([r[:first] for r in rows])
    if update:
        for logits_KBtV, targets_Bt in chunks:
            Kc, Bc, t, V = logits_KBtV.shape
            ll_KN = _token_ll(logits_KBtV.reshape(K, B * t, V), targets_Bt.reshape(-1))
            score_BK += ll_KN.reshape(K, B, t).sum(-1).t()
    generators = [torch.Generator().manual_seed(cfg.seed) for _ in range(B)]
    results = [GenerationResult(tokens=[], log_posterior=[]) for _ in range(B)]
    done = [cfg.max_new_tokens == 0] * B
    device, dtype = last_KBV.device, (last_KBV.dtype if last_KBV.dtype == torch.float64 else torch.float32)
    position = first  # index of the id chosen next
    while not all(done):
        log_w_BK = (cluster.log_weights() if cluster is not None
                    else score_BK - torch.logsumexp(score_BK, dim=-1, keepdim=True))
        mixed_BV = mix_logprobs(last_KBV, log_w_BK.to(device=device, dtype=dtype)).cpu()
        next_B = []
        for b in range(B):
            if position < lengths[b]:
                next_B.append(rows[b][position])  # still inside this row's prompt
            elif done[b]:
                next_B.append(0)  # finished: any id keeps the batch aligned, never read
            else:
                tok = sample_token(mixed_BV[b], cfg, generators[b])
                results[b].tokens.append(tok)
                results[b].log_posterior.append(log_w_BK[b].tolist())
                next_B.append(tok)
        if update:
            ll_KB = _token_ll(last_KBV, torch.tensor(next_B))
            live_B = torch.tensor([not d for d in done])
            score_BK += torch.where(live_B.unsqueeze(-1), ll_KB.t(), 0.0)
        if cluster is not None:
            cluster.append(next_B)
        for b in range(B):
            if position >= lengths[b] and not done[b]:
                tok = results[b].tokens[-1]
                done[b] = len(results[b].tokens) >= cfg.max_new_tokens or tok == cfg.stop_token
        position += 1
        if all(done):
            break
        ids_BT = torch.cat([ids_BT, torch.tensor(next_B).unsqueeze(-1)], dim=1)
        last_KBV = source.step(ids_BT)
    return results
