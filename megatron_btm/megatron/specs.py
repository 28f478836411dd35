"""Layer specs: the only place where Megatron modules are substituted (through ModuleSpec).

- CUDA + Transformer Engine importable: Megatron's TE spec (fused kernels, as in NGC images).
- MoE (`num_experts`): the same spec with Megatron's MoELayer (TopKRouter + SequentialMLP
  experts, no grouped GEMM); the expert linear_fc2 is `ExpertRowParallelLinear`.
- Otherwise: Megatron's local spec with `SDPACoreAttention`, a causal core attention through
  torch's scaled_dot_product_attention (Megatron's default DotProductAttention needs a CUDA
  mask buffer on CPU and is ~25-30% slower there), and `TorchNorm` for every normalization
  (the layers' and the final one: `gpt_block_spec`), Megatron's torch LayerNorm/RMSNorm made
  usable with sequence parallelism.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken TE install without CUDA
        return False
    return torch.cuda.is_available()


class SDPACoreAttention(MegatronModule):
    """Causal core attention: q, k, v [s, b, heads, d] -> context [s, b, heads*d].

    Attention dropout draws from the tensor-parallel RNG tracker (as Megatron's
    DotProductAttention does), so each TP rank drops independently for its own heads.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if k.size(1) != q.size(1):  # grouped-query attention
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        p = self.dropout_p if self.training else 0.0
        if p > 0:
            from megatron.core import tensor_parallel
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                     scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class TorchNorm:
    """Megatron's `WrappedTorchNorm` (a torch LayerNorm or RMSNorm module) that also works with
    sequence parallelism, which WrappedTorchNorm refuses.

    Under sequence parallelism each TP rank normalises its own slice of the sequence with the
    same (replicated) weight and bias, so each rank's gradient of them is a partial sum: the
    parameters are marked `sequence_parallel`, and Megatron's `finalize_model_grads` all-reduces
    their gradients over the TP group, as it does for its fused and TE norms. The forward is
    torch's norm itself. Without sequence parallelism this is WrappedTorchNorm, unchanged.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={config.normalization!r}: the local spec supports "
                             "LayerNorm and RMSNorm")
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("the local spec's torch norms support neither zero-centered gamma "
                             "nor memory-efficient layer norm")
        norm_cls = torch.nn.LayerNorm if config.normalization == "LayerNorm" else torch.nn.RMSNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


class ExpertRowParallelLinear(RowParallelLinear):
    """RowParallelLinear whose output is a fresh tensor.

    Megatron's expert MLP adds its bias in place (`output += bias * per_token_scale`) to the
    output of the TP all-reduce, which autograd forbids (that autograd Function returns its
    input as-is, at any TP size): the copy avoids that. Only experts with biases
    (GPT-2 style) reach it; the copy is of one [tokens, hidden] activation.
    """

    def forward(self, *args, **kwargs):
        output, bias = super().forward(*args, **kwargs)
        return output.clone(), bias


def gpt_layer_spec(use_te: bool | None = None, *, normalization: str = "LayerNorm",
                   qk_layernorm: bool = False, num_experts: int | None = None) -> ModuleSpec:
    """The transformer layer spec for our GPT (TE when available, else local + SDPA).

    The TE spec takes its normalization from the TransformerConfig (TENorm); the local spec
    picks torch LayerNorm or RMSNorm modules here.
    """
    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=qk_layernorm, num_experts=num_experts, moe_grouped_gemm=False)
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm,
                                    num_experts=num_experts, moe_grouped_gemm=False)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    # Megatron's torch-norm fallback (no apex) becomes TorchNorm; the per-head QK norms' grads
    # are all-reduced over TP by name (finalize_model_grads), with or without SP
    for owner, name in ((layer, "input_layernorm"), (layer, "pre_mlp_layernorm"),
                        (attention, "q_layernorm"), (attention, "k_layernorm")):
        if getattr(owner, name) is WrappedTorchNorm:
            setattr(owner, name, TorchNorm)
    if num_experts:
        spec.submodules.mlp.submodules.experts.submodules.linear_fc2 = ExpertRowParallelLinear
    return spec


def gpt_block_spec(layer_spec: ModuleSpec, config, vp_stage: int | None = None):
    """The decoder spec for GPTModel: the TE layer spec as is; a local layer spec as a block
    whose final norm is `TorchNorm` (Megatron's block falls back to WrappedTorchNorm there)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    if layer_spec.submodules.input_layernorm is not TorchNorm:
        return layer_spec
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=TorchNorm)
