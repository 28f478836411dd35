"""GPT model config and builder (Megatron-Core GPTModel).

`GPTConfig` is what a user writes (and what meta.json records); `to_transformer_config` maps it
onto Megatron's TransformerConfig together with the parallel layout of the run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(kw_only=True)
class GPTConfig:
    """Architecture of one expert LM (every expert of a forest shares it)."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Attention heads (hidden_size must be divisible by it)."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 × hidden_size."""
    seq_length: int = 128
    """Training sequence length (also the number of learned positions)."""
    vocab_size: int = 8192
    """Tokenizer vocabulary size (the embedding is padded to a multiple of
    make_vocab_size_divisible_by, independent of TP, so checkpoints reshard across TP)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    init_seed: int = 1234
    """Seed of the parameter initialisation."""
    tie_embeddings: bool = True
    """Share input embedding and output layer (GPT-2 style)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (must be divisible by the TP size)."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r}: must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_attention_heads={self.num_attention_heads}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise ValueError(f"model.ffn_hidden_size={self.ffn_hidden_size}: must be positive or null")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name}={value}: must be in [0, 1)")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> "GPTConfig":
        from megatron_btm.utils.config import from_dict
        return from_dict(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by
        if multiple % tp:
            raise ValueError(f"model.make_vocab_size_divisible_by={multiple} must be divisible by "
                             f"the tensor-parallel size {tp}")
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size or 4 * self.hidden_size
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attn, mlp, two layernorms
        emb = self.padded_vocab_size() * h + self.seq_length * h
        out = 0 if self.tie_embeddings else self.padded_vocab_size() * h
        return self.num_layers * per_layer + emb + out + 2 * h


def to_transformer_config(cfg: GPTConfig, *, tp: int = 1, pp: int = 1, dtype=torch.float32,
                          recompute: bool = False, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig
    kwargs = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_hidden_size,
        hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # fusions trigger torch.compile on CPU (a 23 s first step) and need CUDA kernels
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cuda_graph_scope=[],
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    if kwargs["ffn_hidden_size"] is None:
        kwargs["ffn_hidden_size"] = 4 * cfg.hidden_size
    return TransformerConfig(**kwargs)


def build_model(cfg: GPTConfig, *, tp: int = 1, pp: int = 1, dtype=torch.float32,
                transformer_config=None, pre_process=None, post_process=None, use_te=None,
                vp_stage: int | None = None):
    """Build this rank's GPTModel chunk. Needs model-parallel state (`parallel.setup_model_parallel`).

    Initial weights depend on `cfg.init_seed` (seeded by the caller through `parallel.seed_all`)
    and on the pipeline layout: with CPU initialisation TP shards are cut from the same full
    tensor, but a later pipeline stage draws its layers from a different point of the RNG
    stream. To start several layouts from identical weights, load one checkpoint
    (`save_initial_weights` + `init_from`); checkpoints reshard across any TP/PP.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_btm.megatron.specs import gpt_layer_spec
    if transformer_config is None:
        transformer_config = to_transformer_config(cfg, tp=tp, pp=pp, dtype=dtype)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=transformer_config, transformer_layer_spec=gpt_layer_spec(use_te),
        vocab_size=cfg.padded_vocab_size(tp), max_sequence_length=cfg.seq_length,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="learned_absolute", vp_stage=vp_stage)
