"""Megatron GPTModel (our layout) → `transformers` GPT2LMHeadModel: key mapping and config.

Pure functions over tensors. Conventions on each side:
- Megatron linear weights are [out, in] (y = x Wᵀ + b); HF GPT-2 uses `Conv1D`, weight [in, out]
  (y = x W + b), so every linear is transposed.
- Megatron's fused QKV rows are grouped by query group g and then by kind:
  [q heads of g; k_g; v_g] for g = 0..ng-1 (megatron/core/transformer/attention.py,
  `get_query_key_value_tensors`: view [.., ng, (np/ng + 2)·hn] then split). With plain multi-head
  attention (ng = heads, our only case) that is [q_0; k_0; v_0; q_1; k_1; v_1; ...]. HF `c_attn`
  wants [q (all heads) | k | v] along its output axis.
- Layer norms: Megatron's sharded keys name them after the fused TE module
  (`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`) even with
  the local spec; checkpoints of unfused layouts use `input_layernorm.weight` etc. Both are read.
- The vocabulary: Megatron pads it to a multiple of 128 (TP-independent). By default the export
  slices the padding off (HF vocab = the tokenizer's), so generation can never emit an id the
  tokenizer cannot decode; the logits of real tokens are unchanged, and the padded rows were
  never targets in training, so their probability mass is negligible (not exactly zero: a
  softmax over the sliced vocab renormalises it away). `keep_padded_vocab` keeps them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

LAYERS = "decoder.layers."
# (HF GPT-2 key under transformer.h.<i>., Megatron stacked key(s) under decoder.layers., transpose)
_LAYER_MAP: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("ln_1.weight", ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"), False),
    ("ln_1.bias", ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"), False),
    ("attn.c_proj.weight", ("self_attention.linear_proj.weight",), True),
    ("attn.c_proj.bias", ("self_attention.linear_proj.bias",), False),
    ("ln_2.weight", ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"), False),
    ("ln_2.bias", ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"), False),
    ("mlp.c_fc.weight", ("mlp.linear_fc1.weight",), True),
    ("mlp.c_fc.bias", ("mlp.linear_fc1.bias",), False),
    ("mlp.c_proj.weight", ("mlp.linear_fc2.weight",), True),
    ("mlp.c_proj.bias", ("mlp.linear_fc2.bias",), False),
)
_QKV_W = "self_attention.linear_qkv.weight"
_QKV_B = "self_attention.linear_qkv.bias"
_GLOBAL_MAP = (
    ("transformer.wpe.weight", "embedding.position_embeddings.weight"),
    ("transformer.ln_f.weight", "decoder.final_layernorm.weight"),
    ("transformer.ln_f.bias", "decoder.final_layernorm.bias"),
)
WORD_EMB = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


def required_keys(available: set[str] | Mapping[str, Any], tie_embeddings: bool) -> list[str]:
    """The Megatron keys the export reads, resolving which layer-norm naming the checkpoint uses."""
    keys = [WORD_EMB, *(m for _, m in _GLOBAL_MAP), LAYERS + _QKV_W, LAYERS + _QKV_B]
    for hf, candidates, _ in _LAYER_MAP:
        found = [LAYERS + c for c in candidates if LAYERS + c in available]
        if not found:
            raise ValueError(f"checkpoint has none of {[LAYERS + c for c in candidates]} "
                             f"(needed for HF {hf}); not a GPT checkpoint of our layout?")
        keys.append(found[0])
    if not tie_embeddings:
        keys.append(OUTPUT)
    return keys


def split_fused_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int) -> torch.Tensor:
    """Megatron fused QKV rows (weight [(np+2ng)·hn, h] or bias [(np+2ng)·hn]) → [q | k | v] rows."""
    per_group = num_heads // num_query_groups + 2
    head_dim = qkv.shape[0] // (num_query_groups * per_group)
    grouped = qkv.reshape(num_query_groups, per_group, head_dim, *qkv.shape[1:])
    q = grouped[:, :-2].reshape(-1, *qkv.shape[1:])  # [np·hn, ...] in head order
    k = grouped[:, -2].reshape(-1, *qkv.shape[1:])
    v = grouped[:, -1].reshape(-1, *qkv.shape[1:])
    return torch.cat([q, k, v], dim=0)


def megatron_to_gpt2(state: Mapping[str, torch.Tensor], *, num_layers: int, num_heads: int,
                     vocab_size: int, tie_embeddings: bool,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Map Megatron global tensors (layers stacked on axis 0) to GPT2LMHeadModel's state dict.

    `vocab_size` rows of the (padded) embedding/output are kept. Tensors come out contiguous in
    `dtype` (conversion after the fp32-exact reshapes, so no double rounding).
    """
    get: Callable[[str], torch.Tensor] = lambda k: state[k]  # noqa: E731
    out: dict[str, torch.Tensor] = {}

    def put(key, t):
        out[key] = t.to(dtype).contiguous()

    emb_VH = get(WORD_EMB)
    if vocab_size > emb_VH.shape[0]:
        raise ValueError(f"vocab_size={vocab_size} exceeds the checkpoint's embedding rows "
                         f"{emb_VH.shape[0]}")
    put("transformer.wte.weight", emb_VH[:vocab_size])
    for hf, mk in _GLOBAL_MAP:
        put(hf, get(mk))
    if not tie_embeddings:
        put("lm_head.weight", get(OUTPUT)[:vocab_size])
    stacked = {k[len(LAYERS):]: v for k, v in state.items() if k.startswith(LAYERS)}
    for name, t in stacked.items():
        if t.shape[0] != num_layers:
            raise ValueError(f"{LAYERS}{name}: leading (layer) axis is {t.shape[0]}, expected "
                             f"num_layers={num_layers}")
    for i in range(num_layers):
        pre = f"transformer.h.{i}."
        put(pre + "attn.c_attn.weight", split_fused_qkv(stacked[_QKV_W][i], num_heads, num_heads).T)
        put(pre + "attn.c_attn.bias", split_fused_qkv(stacked[_QKV_B][i], num_heads, num_heads))
        for hf, candidates, transpose in _LAYER_MAP:
            src = next(stacked[c][i] for c in candidates if c in stacked)
            put(pre + hf, src.T if transpose else src)
    return out


def gpt2_config_kwargs(model_config: Mapping[str, Any], *, vocab_size: int, eos_token_id: int,
                       dtype_name: str) -> dict[str, Any]:
    """GPT2Config arguments equivalent to our GPTConfig (as stored in meta.json)."""
    h = model_config["hidden_size"]
    return dict(
        vocab_size=vocab_size, n_positions=model_config["seq_length"], n_embd=h,
        n_layer=model_config["num_layers"], n_head=model_config["num_attention_heads"],
        n_inner=model_config.get("ffn_hidden_size") or 4 * h,
        activation_function="gelu",  # exact erf GeLU, as Megatron's local MLP (not "gelu_new")
        layer_norm_epsilon=1e-5, initializer_range=model_config.get("init_method_std", 0.02),
        resid_pdrop=model_config.get("hidden_dropout", 0.0),
        embd_pdrop=model_config.get("hidden_dropout", 0.0),
        attn_pdrop=model_config.get("attention_dropout", 0.0),
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=bool(model_config.get("tie_embeddings", True)),
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, architectures=["GPT2LMHeadModel"],
        dtype=dtype_name)
