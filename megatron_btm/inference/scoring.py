"""Run expert checkpoints: load one at the current TP (any saved TP/PP), score token blocks.

An `Expert` is one loaded GPTModel in eval mode. It gives
- `logits(inputs_BT)`: this TP rank's vocab slice [B, T, V_local] in fp32, with the vocabulary
  padding (ids >= the model's vocab_size) set to −inf, so the model is a distribution over the
  real vocabulary only (what the tokenizer can produce);
- `full_logits(inputs_BT)`: [B, T, V] over the real vocabulary, gathered over TP (generation);
- `token_ll(blocks_BT1)`: log p(x_t | x_<t) [B, T] for the targets blocks[:, 1:] (0 where the
  target is IGNORE), through the fused op `ops.mix_nll` with one expert (vocab-parallel aware).

Evaluation runs at pipeline size 1 (any TP): a checkpoint saved at any TP/PP loads into it
through Megatron's dist_checkpointing resharding. We build the bare GPTModel (no DDP, no
optimizer) — evaluation needs neither — and load weights-only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

IGNORE = -100  # target id of padding positions in a block (ops.mix_nll's ignore_index)


def ensure_parallel(tp: int | None = None) -> int:
    """Initialise torch.distributed (world 1 by default) and Megatron's groups at (tp, pp=1)
    unless they already exist with pp = 1 and that TP (tp=None: any). Returns the TP size.
    Re-creating the groups (as `training.loop.load_for_eval` does) replaces the caller's."""
    from megatron.core import parallel_state as ps

    from megatron_btm.megatron import parallel
    parallel.init_distributed()
    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() == 1:
        current = ps.get_tensor_model_parallel_world_size()
        if tp is None or tp == current:
            return current
    tp = 1 if tp is None else tp
    parallel.setup_model_parallel(parallel.ParallelConfig(tp=tp, pp=1))
    return tp


def _tp_group():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


@dataclass
class Expert:
    """One loaded LM (eval mode) with its GPTConfig; `name` labels it in tables and errors."""

    name: str
    model: Any
    config: Any  # GPTConfig
    checkpoint: Path

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def seq_length(self) -> int:
        return self.config.seq_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_inputs(self, inputs_BT: torch.Tensor) -> None:
        if inputs_BT.dim() != 2:
            raise ValueError(f"{self.name}: token inputs must be [batch, time], got "
                             f"{tuple(inputs_BT.shape)}")
        if inputs_BT.shape[1] > self.seq_length:
            raise ValueError(f"{self.name}: {inputs_BT.shape[1]} positions exceed the model's "
                             f"seq_length={self.seq_length}")
        if inputs_BT.numel() and (int(inputs_BT.min()) < 0 or int(inputs_BT.max()) >= self.vocab_size):
            raise ValueError(f"{self.name}: token ids must be in [0, {self.vocab_size}), got "
                             f"[{int(inputs_BT.min())}, {int(inputs_BT.max())}]")

    @torch.no_grad()
    def logits(self, inputs_BT: torch.Tensor) -> torch.Tensor:
        """[B, T, V_local] fp32 logits of this TP rank's vocab slice; padding ids are −inf."""
        from megatron.core import parallel_state as ps
        self._check_inputs(inputs_BT)
        inputs_BT = inputs_BT.long().to(self.device)
        B, T = inputs_BT.shape
        position_ids_BT = torch.arange(T, device=self.device).unsqueeze(0).expand(B, T)
        logits_BTV = self.model(inputs_BT, position_ids_BT, None).float()
        V_local = logits_BTV.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * V_local
        # Padded vocab ids (>= vocab_size) are this slice's last columns, if any: set those in
        # place (a masked_fill would write a second [B, T, V] copy).
        first_pad = min(max(self.vocab_size - start, 0), V_local)
        if first_pad < V_local:
            logits_BTV[..., first_pad:] = float("-inf")
        return logits_BTV

    @torch.no_grad()
    def full_logits(self, inputs_BT: torch.Tensor) -> torch.Tensor:
        """[B, T, vocab_size] fp32 logits over the real vocabulary (gathered over TP)."""
        logits_BTV = self.logits(inputs_BT)
        group = _tp_group()
        if group is not None:
            parts = [torch.empty_like(logits_BTV) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, logits_BTV.contiguous(), group=group)
            logits_BTV = torch.cat(parts, dim=-1)
        return logits_BTV[..., :self.vocab_size]

    @torch.no_grad()
    def token_ll(self, blocks_BT1: torch.Tensor) -> torch.Tensor:
        """[B, T] float64 (CPU) log p(blocks[:, t+1] | blocks[:, :t+1]); 0 where the target is IGNORE."""
        from megatron_btm.ops import mix_nll
        inputs_BT, targets_BT = split_block(blocks_BT1)
        logits_BTV = self.logits(inputs_BT)
        B, T, V = logits_BTV.shape
        zero_w_N1 = torch.zeros(B * T, 1, dtype=torch.float32, device=logits_BTV.device)
        _, ll_1N = mix_nll(logits_BTV.reshape(1, B * T, V), zero_w_N1,
                           targets_BT.reshape(-1).to(logits_BTV.device),
                           ignore_index=IGNORE, tp_group=_tp_group())
        return ll_1N.reshape(B, T).double().cpu()


def split_block(blocks_BT1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], targets [B, T]) of blocks [B, T+1] whose padding is IGNORE: padded
    inputs become token 0 (they only feed positions whose targets are ignored)."""
    if blocks_BT1.dim() != 2 or blocks_BT1.shape[1] < 2:
        raise ValueError(f"blocks must be [batch, T+1] with T >= 1, got {tuple(blocks_BT1.shape)}")
    blocks_BT1 = blocks_BT1.long()
    return blocks_BT1[:, :-1].clamp(min=0), blocks_BT1[:, 1:]


def model_config_of(checkpoint: str | os.PathLike):
    """GPTConfig from a checkpoint's meta.json (the checkpoint folder, or a folder resolving to one)."""
    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    from megatron_btm.megatron.model import GPTConfig
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    if not isinstance(meta.get("model_config"), dict):
        raise ValueError(f"{ckpt / 'meta.json'}: key 'model_config' missing or not a mapping "
                         "(cannot rebuild the model)")
    return GPTConfig.from_dict(meta["model_config"], where=f"{ckpt / 'meta.json'}: model_config"), ckpt


def load_expert(checkpoint: str | os.PathLike, *, name: str | None = None,
                tp: int | None = None, dtype=torch.float32,
                overrides: dict[str, Any] | None = None) -> Expert:
    """Load a checkpoint saved at any TP/PP into a model at the current TP (pp = 1), eval mode.
    `overrides`: model fields that change only how it runs (an MoE's moe_router_topk)."""
    import dataclasses

    from megatron_btm.megatron import device, parallel
    from megatron_btm.megatron.checkpoint import load_weights
    from megatron_btm.megatron.model import build_model
    from megatron_btm.megatron.model import to_transformer_config
    cfg, ckpt = model_config_of(checkpoint)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)  # validated again (__post_init__)
    tp = ensure_parallel(tp)
    parallel.seed_all(cfg.init_seed)  # builder's init is overwritten; seeding keeps it cheap & deterministic
    tc = None
    if getattr(cfg, "num_moe_experts", None) and cfg.moe_router_topk == 1 and cfg.num_moe_experts > 1:
        # top-1 of the renormalised top-k router: weight 1 on the argmax expert. Megatron refuses
        # k=1 without pre-softmax (no router gradient, which evaluation does not need): build the
        # config at k=2 and set k=1 before any module reads it.
        tc = to_transformer_config(dataclasses.replace(cfg, moe_router_topk=2), tp=tp, dtype=dtype)
        tc.moe_router_topk = 1
    model = build_model(cfg, tp=tp, pp=1, dtype=dtype, pre_process=True, post_process=True,
                        transformer_config=tc).to(device.current())  # inputs follow Expert.device
    load_weights([model], ckpt)
    model.eval()
    return Expert(name=name or ckpt.parent.name, model=model, config=cfg, checkpoint=ckpt)


def check_compatible(experts: Sequence[Expert]) -> None:
    """Experts mixed token by token must share a vocabulary (same ids, same size)."""
    vocabs = {e.name: e.vocab_size for e in experts}
    if len(set(vocabs.values())) > 1:
        raise ValueError(f"experts have different vocab sizes {vocabs}; an ensemble needs one "
                         "shared tokenizer")


def score_blocks(expert: Expert, blocks_NT1: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """[N, T] float64 token log-likelihoods of one expert over N blocks, batch by batch."""
    if blocks_NT1.shape[0] == 0:
        return torch.zeros(0, max(blocks_NT1.shape[1] - 1, 0), dtype=torch.float64)
    return torch.cat([expert.token_ll(blocks_NT1[i:i + batch_size])
                      for i in range(0, blocks_NT1.shape[0], batch_size)])


def score_checkpoints(checkpoints: Sequence[tuple[str, str | os.PathLike]],
                      blocks: dict[str, torch.Tensor], *, tp: int | None = None,
                      batch_size: int = 8, progress: bool = False,
                      overrides: Sequence[dict[str, Any] | None] | None = None) -> dict[str, torch.Tensor]:
    """{domain: [N, T, K] float64 ll} for K checkpoints (name, path) over each domain's blocks.
    `overrides`: per checkpoint, as in `load_expert` (e.g. the top-k of an MoE row).

    Experts are loaded one at a time (only one model in memory) and each scores every domain;
    the log-likelihoods do not depend on priors, so every ensemble row reuses them. `progress`:
    a bar over (expert, domain) on stderr.
    """
    from tqdm import tqdm
    per_domain: dict[str, list[torch.Tensor]] = {d: [] for d in blocks}
    vocab: dict[str, int] = {}
    bar = tqdm(total=len(checkpoints) * len(blocks), desc="scoring", unit="expert-domain",
               disable=not progress, leave=False)
    for j, (name, path) in enumerate(checkpoints):
        expert = load_expert(path, name=name, tp=tp, overrides=overrides[j] if overrides else None)
        vocab[name] = expert.vocab_size
        for domain, b in blocks.items():
            bar.set_postfix_str(f"{name} on {domain}")
            per_domain[domain].append(score_blocks(expert, b, batch_size=batch_size))
            bar.update()
        del expert
    bar.close()
    if len(set(vocab.values())) > 1:
        raise ValueError(f"experts have different vocab sizes {vocab}; an ensemble needs one "
                         "shared tokenizer")
    return {d: torch.stack(lls, dim=-1) for d, lls in per_domain.items()}


def load_experts(checkpoints: Iterable[tuple[str, str | os.PathLike]], *,
                 tp: int | None = None) -> list[Expert]:
    """All experts in memory at once (generation needs every expert's logits at each step)."""
    experts = [load_expert(path, name=name, tp=tp) for name, path in checkpoints]
    if not experts:
        raise ValueError("no checkpoints given; need at least one expert")
    check_compatible(experts)
    return experts
