"""GPT model config and builder (Megatron-Core GPTModel).

`GPTConfig` is what a user writes (and what meta.json records); `to_transformer_config` maps it
onto Megatron's TransformerConfig together with the parallel layout of the run.

Architectures are Megatron-Core's own fields (position embedding, normalization, gated MLP, GQA,
biases, QK-norm, tying), named by a preset: `arch: llama` fills every architecture field the
user left unset (None) from `PRESETS["llama"]`; explicit fields win. `gpt2` is the default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


# MoE fields that change how a model trains or routes, not its weights: checkpoints that differ
# only in these average, branch and load into each other (the other moe_* fields are compared).
MOE_TRAINING_FIELDS = frozenset({"moe_router_topk", "moe_router_load_balancing_type",
                                 "moe_aux_loss_coeff", "moe_token_dispatcher_type"})


@dataclass(kw_only=True)
class GPTConfig:
    """Architecture of one expert LM (every expert of a forest shares it)."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Attention heads (hidden_size must be divisible by it unless kv_channels is set)."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 × hidden_size."""
    seq_length: int = 128
    """Training sequence length (with learned_absolute positions also their number)."""
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
    tie_embeddings: bool | None = None
    """Share input embedding and output layer (GPT-2 style; preset default)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (must be divisible by the TP size)."""
    arch: str = "gpt2"
    """Architecture preset (gpt2, llama, qwen2, qwen3) filling the fields below left unset."""
    position_embedding_type: str | None = None
    """learned_absolute (GPT-2) or rope."""
    rotary_base: float | None = None
    """RoPE base (theta)."""
    rope_scaling_factor: float | None = None
    """Llama-3.x RoPE frequency scaling with this factor (Megatron's rope_scaling); null: none."""
    normalization: str | None = None
    """LayerNorm or RMSNorm."""
    layernorm_epsilon: float | None = None
    """Epsilon of every normalization."""
    gated_linear_unit: bool | None = None
    """Gated MLP (SwiGLU with activation silu): linear_fc1 holds [gate; up]."""
    activation: str | None = None
    """MLP activation: gelu (exact erf), gelu_tanh (GPT-2's gelu_new) or silu."""
    num_query_groups: int | None = None
    """Key/value heads of grouped-query attention; None means num_attention_heads."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    add_bias_linear: bool | None = None
    """Biases on every linear layer (GPT-2)."""
    add_qkv_bias: bool | None = None
    """Biases on the QKV projection only (Qwen2)."""
    qk_layernorm: bool | None = None
    """Normalize queries and keys per head before RoPE (Qwen3)."""
    num_moe_experts: int | None = None
    """Mixture of experts: MoE experts per layer (Megatron MoELayer, SequentialMLP); null: dense."""
    moe_router_topk: int = 2
    """MoE: experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """MoE: width of each expert's MLP; null: ffn_hidden_size."""
    moe_router_load_balancing_type: str = "aux_loss"
    """MoE: aux_loss (Switch), seq_aux_loss or none."""
    moe_aux_loss_coeff: float = 0.01
    """MoE: weight of the load-balancing aux loss."""
    moe_router_enable_expert_bias: bool = False
    """MoE: aux-loss-free load balancing (a per-expert bias updated from the token counts;
    Megatron allows it with moe_router_score_function=sigmoid only)."""
    moe_router_score_function: str = "softmax"
    """MoE: router scores, softmax (Mixtral, BTX) or sigmoid (DeepSeek-V3 style)."""
    moe_token_dispatcher_type: str = "alltoall"
    """MoE: token dispatcher, alltoall or allgather (both run on the CPU backend)."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r}: must be a positive integer")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by "
                             f"model.num_attention_heads={self.num_attention_heads}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise ValueError(f"model.ffn_hidden_size={self.ffn_hidden_size}: must be positive or null")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name}={value}: must be in [0, 1)")
        if self.arch not in PRESETS:
            raise ValueError(f"model.arch={self.arch!r}: unknown architecture; valid: {sorted(PRESETS)}")
        for name, value in PRESETS[self.arch].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check_arch_fields(self)
        _check_moe_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> "GPTConfig":
        from megatron_btm.utils.config import from_dict
        return from_dict(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        """Every field; a dense model leaves out the moe_* fields (meta.json as before MoE)."""
        data = dataclasses.asdict(self)
        if self.num_moe_experts is None:
            for name in MOE_FIELDS:
                data.pop(name)
        return data

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by
        if multiple % tp:
            raise ValueError(f"model.make_vocab_size_divisible_by={multiple} must be divisible by "
                             f"the tensor-parallel size {tp}")
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def expert_mlp_parameters(self) -> int:
        """One MLP (the dense one, or one MoE expert): linear_fc1 ([gate; up] when gated) and
        linear_fc2, with their biases."""
        h = self.hidden_size
        f = self.expert_ffn_hidden_size if self.num_moe_experts else self.ffn_hidden_size or 4 * h
        up = 2 * f if self.gated_linear_unit else f
        return h * up + f * h + (up + h if self.add_bias_linear else 0)

    def router_parameters(self) -> int:
        """Every layer's router: [n, h] (+ bias [n] with biases); 0 for a dense model."""
        n = self.num_moe_experts or 0
        return self.num_layers * n * (self.hidden_size + (1 if self.add_bias_linear else 0))

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        norm = 2 * h if self.normalization == "LayerNorm" else h  # weight (+ bias)
        q, kv = self.num_attention_heads * d, self.query_groups * d
        attn = h * (q + 2 * kv) + q * h + (2 * d if self.qk_layernorm else 0)
        if self.add_bias_linear:
            attn += q + 2 * kv + h
        elif self.add_qkv_bias:
            attn += q + 2 * kv
        mlp = (self.num_moe_experts or 1) * self.expert_mlp_parameters()   # n expert MLPs
        emb = self.padded_vocab_size() * h
        if self.position_embedding_type == "learned_absolute":
            emb += self.seq_length * h
        out = 0 if self.tie_embeddings else self.padded_vocab_size() * h
        return self.num_layers * (attn + mlp + 2 * norm) + emb + out + norm + self.router_parameters()

    def num_active_parameters(self) -> int:
        """Parameters one token goes through: all but, in each layer, the MLPs of the n - topk
        experts it is not routed to (every router row scores it); a dense model: all."""
        idle = (self.num_moe_experts or 0) - min(self.moe_router_topk, self.num_moe_experts or 0)
        return self.num_parameters() - self.num_layers * idle * self.expert_mlp_parameters()


_BASE = dict(position_embedding_type="learned_absolute", rotary_base=10000, rope_scaling_factor=None,
             normalization="LayerNorm", layernorm_epsilon=1e-5, gated_linear_unit=False,
             activation="gelu", num_query_groups=None, kv_channels=None, add_bias_linear=True,
             add_qkv_bias=False, qk_layernorm=False, tie_embeddings=True)
_LLAMA = dict(_BASE, position_embedding_type="rope", normalization="RMSNorm", gated_linear_unit=True,
              activation="silu", add_bias_linear=False, tie_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": _BASE,                                       # GPT-2 (today's default)
    "llama": _LLAMA,                                     # Llama-2/3, Mistral
    "qwen2": dict(_LLAMA, add_qkv_bias=True, rotary_base=1000000, layernorm_epsilon=1e-6),
    "qwen3": dict(_LLAMA, qk_layernorm=True, rotary_base=1000000, layernorm_epsilon=1e-6),
}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new" (tanh approximation)."""
    import torch
    return torch.nn.functional.gelu(x, approximate="tanh")


# MLP activations: gelu is the exact erf GeLU (Megatron's default)
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "silu")
_CHOICES = {"position_embedding_type": ("learned_absolute", "rope"),
            "normalization": ("LayerNorm", "RMSNorm"), "activation": ACTIVATION_NAMES}


def activation_func(name: str):
    """The torch function of an activation name (torch is imported here, not by GPTConfig)."""
    import torch
    return {"gelu": torch.nn.functional.gelu, "gelu_tanh": gelu_tanh,
            "silu": torch.nn.functional.silu}[name]


def _check_arch_fields(cfg: GPTConfig) -> None:
    for name, valid in _CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"model.{name}={getattr(cfg, name)!r}: valid values are {list(valid)}")
    for name in ("gated_linear_unit", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "tie_embeddings"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"model.{name}={getattr(cfg, name)!r}: must be true or false")
    for name in ("rotary_base", "layernorm_epsilon"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"model.{name}={value!r}: must be a positive number")
    if cfg.rope_scaling_factor is not None and not cfg.rope_scaling_factor > 0:
        raise ValueError(f"model.rope_scaling_factor={cfg.rope_scaling_factor!r}: must be positive or null")
    for name in ("num_query_groups", "kv_channels"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"model.{name}={value!r}: must be a positive integer or null")
    if cfg.num_attention_heads % cfg.query_groups:
        raise ValueError(f"model.num_attention_heads={cfg.num_attention_heads} must be divisible by "
                         f"model.num_query_groups={cfg.num_query_groups}")


MOE_FIELDS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
              "moe_router_load_balancing_type", "moe_aux_loss_coeff",
              "moe_router_enable_expert_bias", "moe_router_score_function",
              "moe_token_dispatcher_type")
_MOE_CHOICES = {"moe_router_load_balancing_type": ("aux_loss", "seq_aux_loss", "none"),
                "moe_token_dispatcher_type": ("alltoall", "allgather"),
                "moe_router_score_function": ("softmax", "sigmoid")}


def _check_moe_fields(cfg: GPTConfig) -> None:
    n = cfg.num_moe_experts
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"model.num_moe_experts={n!r}: must be a positive integer or null")
    k = cfg.moe_router_topk
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"model.moe_router_topk={k!r}: must be an integer in [1, num_moe_experts={n}]")
    if cfg.moe_ffn_hidden_size is not None and cfg.moe_ffn_hidden_size < 1:
        raise ValueError(f"model.moe_ffn_hidden_size={cfg.moe_ffn_hidden_size}: must be positive or null")
    for name, valid in _MOE_CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"model.{name}={getattr(cfg, name)!r}: valid values are {list(valid)}")
    if not cfg.moe_aux_loss_coeff >= 0:
        raise ValueError(f"model.moe_aux_loss_coeff={cfg.moe_aux_loss_coeff!r}: must be >= 0")
    if not isinstance(cfg.moe_router_enable_expert_bias, bool):
        raise ValueError(f"model.moe_router_enable_expert_bias={cfg.moe_router_enable_expert_bias!r}: "
                         "must be true or false")
    if cfg.moe_router_enable_expert_bias and cfg.moe_router_score_function != "sigmoid":
        raise ValueError("model.moe_router_enable_expert_bias=true: Megatron-Core allows the "
                         "aux-loss-free expert bias only with model.moe_router_score_function=sigmoid")


def _moe_kwargs(cfg: GPTConfig) -> dict[str, Any]:
    if not cfg.num_moe_experts:
        return {}
    return dict(num_moe_experts=cfg.num_moe_experts, moe_router_topk=cfg.moe_router_topk,
                moe_ffn_hidden_size=cfg.expert_ffn_hidden_size,
                moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
                moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
                moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
                moe_router_score_function=cfg.moe_router_score_function,
                moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
                moe_router_dtype="fp32", moe_grouped_gemm=False, moe_permute_fusion=False,
                # experts are not tensor-parallel (Megatron supports MoE biases only so); the
                # process groups must match: initialize_model_parallel(expert_tensor_parallel_size=1)
                expert_tensor_parallel_size=1)


def to_transformer_config(cfg: GPTConfig, *, tp: int = 1, pp: int = 1, dtype=None,
                          recompute: bool = False, **overrides):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig
    dtype = torch.float32 if dtype is None else dtype
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
        normalization=cfg.normalization, layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=activation_func(cfg.activation),
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm, **_moe_kwargs(cfg),
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    if kwargs["ffn_hidden_size"] is None:
        kwargs["ffn_hidden_size"] = 4 * cfg.hidden_size
    return TransformerConfig(**kwargs)


def build_model(cfg: GPTConfig, *, tp: int = 1, pp: int = 1, dtype=None,
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

    from megatron_btm.megatron.specs import gpt_block_spec, gpt_layer_spec
    if transformer_config is None:
        transformer_config = to_transformer_config(cfg, tp=tp, pp=pp, dtype=dtype)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    layer_spec = gpt_layer_spec(use_te, normalization=cfg.normalization,
                                qk_layernorm=cfg.qk_layernorm, num_experts=cfg.num_moe_experts)
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=gpt_block_spec(layer_spec, transformer_config, vp_stage),
        vocab_size=cfg.padded_vocab_size(tp), max_sequence_length=cfg.seq_length,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding_type, rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0, vp_stage=vp_stage)
