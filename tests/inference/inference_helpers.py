"""Helpers for the inference tests: pico models and independent float64 references."""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SEQ = 16


@dataclass
class TinyWorld:
    root: Path
    tokenizer: Path
    vocab: int
    data: Path
    forest: Path
    checkpoints: list
    models: list


def pico_config(vocab: int, seed: int):
    from megatron_btm.megatron.model import GPTConfig
    return GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                     vocab_size=vocab, init_method_std=0.4, init_seed=seed)


def build_pico(cfg, tp: int = 1):
    from megatron_btm.megatron.model import build_model
    from megatron_btm.megatron.parallel import ParallelConfig, seed_all, setup_model_parallel
    setup_model_parallel(ParallelConfig(tp=tp))
    seed_all(cfg.init_seed)
    model = build_model(cfg, tp=tp)
    model.eval()
    return model


@torch.no_grad()
def forward_logprobs(model, ids_BT: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, T, vocab] float64 log-probabilities over the real vocabulary, straight from the
    Megatron model (TP=1): the reference every scoring path is checked against."""
    B, T = ids_BT.shape
    logits = model(ids_BT, torch.arange(T).expand(B, T), None).double()[..., :vocab]
    return torch.log_softmax(logits, dim=-1)


def slow_ensemble_nll(lp_KTV: torch.Tensor, targets_T: list[int], prior: list[float], *,
                      update: bool = True, topk_token: int | None = None) -> list[float]:
    """Explicit loops over positions and experts in Python floats (one block):
    w_t ∝ π_j Π_{s<t} p_j(x_s) (or π with update=False), optional top-k of w_t, then
    nll_t = −log Σ_j w_tj p_j(x_t). Targets < 0 are skipped (no evidence, nll 0)."""
    K = lp_KTV.shape[0]
    score = [math.log(p) if p > 0 else -math.inf for p in prior]
    out = []
    for t, y in enumerate(targets_T):
        if y < 0:
            out.append(0.0)
            continue
        m = max(score)
        w = [math.exp(s - m) for s in score]
        if topk_token is not None:
            keep = sorted(range(K), key=lambda j: -w[j])[:topk_token]
            w = [w[j] if j in keep else 0.0 for j in range(K)]
        z = sum(w)
        p = sum(w[j] / z * math.exp(float(lp_KTV[j, t, y])) for j in range(K))
        out.append(-math.log(p))
        if update:
            score = [score[j] + float(lp_KTV[j, t, y]) for j in range(K)]
    return out


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `btm ARGV` run in this process."""
    from megatron_btm import cli
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err
