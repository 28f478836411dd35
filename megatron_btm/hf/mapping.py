"""Megatron GPTModel <-> Hugging Face state dicts: one mapping table per family, both directions.

Pure functions over tensors. A `Rule` ties one Megatron global tensor to the HF tensor(s) it is
made of, with a `kind` saying how (each kind has a forward and an inverse, so import and export
read the same table):

- copy       same tensor.
- transpose  GPT-2's Conv1D stores linear weights [in, out]; Megatron [out, in].
- vocab      embedding / output rows: Megatron pads the vocabulary (zero rows on import;
             export keeps the first `vocab_size` rows).
- qkv        HF q, k, v projections (weights [heads·d, h] or biases) -> Megatron's fused rows,
             grouped by query group g: [q heads of g; k_g; v_g] for g = 0..ng-1
             (megatron/core/transformer/attention.py, `get_query_key_value_tensors`).
- qkv_conv1d GPT-2's fused c_attn ([h, q|k|v] weight or [q|k|v] bias) -> the same fused rows.
- glu        HF gate and up projections -> Megatron's gated linear_fc1 rows [gate; up].

MoE tables (Mixtral) add expert rules: one HF tensor per (layer, expert), one Megatron tensor
stacked [layer, expert, ...] (`Table.experts`).

Megatron side: layer tensors are stacked on a leading axis under `decoder.layers.` (what the
torch_dist checkpoint stores; each rule handles one layer's slice). Layer norms are named after
the fused TE module (`self_attention.linear_qkv.layer_norm_weight`) even with the local spec;
checkpoints of unfused layouts use `input_layernorm.weight` etc. (`ALIASES`, read on export).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

LAYERS = "decoder.layers."
ALIASES = {  # fused-TE name -> unfused name (either may be stored)
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
# linear layers whose (empty, local spec) `_extra_state` Megatron saves as a ShardedObject per layer
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def extra_state_keys(cfg) -> list[str]:
    """The `_extra_state` ShardedObject keys of a checkpoint of `cfg` (MoE: per layer and expert)."""
    L, n = cfg.num_layers, getattr(cfg, "num_moe_experts", None)
    keys = [f"{LAYERS}{name}._extra_state/shard_{i}_{L}" for name in LINEARS[:2 if n else 4]
            for i in range(L)]
    if n:
        keys += [f"{LAYERS}{MOE_EXPERTS}{fc}._extra_state/shard_{i}.{e}_{L}.{n}"
                 for fc in ("linear_fc1", "linear_fc2") for i in range(L) for e in range(n)]
    return keys


@dataclass(frozen=True)
class Rule:
    megatron: str
    """Megatron key; relative to `decoder.layers.` for layer rules."""
    hf: tuple[str, ...]
    """HF key(s); `{i}` is the layer index in layer rules."""
    kind: str = "copy"
    when: Callable | None = None
    """Predicate on the GPTConfig: the tensor exists only when it holds."""


@dataclass(frozen=True)
class Table:
    family: str
    globals: tuple[Rule, ...]
    layers: tuple[Rule, ...]
    experts: tuple[Rule, ...] = ()
    """MoE expert rules: Megatron key stacked [layer, expert, ...]; HF keys with `{i}` and `{e}`."""

    def rules(self, cfg) -> tuple[list[Rule], list[Rule]]:
        keep = [r for r in self.globals if r.when is None or r.when(cfg)]
        return keep, [r for r in self.layers if r.when is None or r.when(cfg)]


def _untied(cfg) -> bool:
    return not cfg.tie_embeddings


GPT2 = Table("gpt2", globals=(
    Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
    Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
    Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
    Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", _untied),
), layers=tuple(Rule(m, (f"transformer.h.{{i}}.{h}",), k) for m, h, k in (
    ("self_attention.linear_qkv.layer_norm_weight", "ln_1.weight", "copy"),
    ("self_attention.linear_qkv.layer_norm_bias", "ln_1.bias", "copy"),
    ("self_attention.linear_qkv.weight", "attn.c_attn.weight", "qkv_conv1d"),
    ("self_attention.linear_qkv.bias", "attn.c_attn.bias", "qkv_conv1d"),
    ("self_attention.linear_proj.weight", "attn.c_proj.weight", "transpose"),
    ("self_attention.linear_proj.bias", "attn.c_proj.bias", "copy"),
    ("mlp.linear_fc1.layer_norm_weight", "ln_2.weight", "copy"),
    ("mlp.linear_fc1.layer_norm_bias", "ln_2.bias", "copy"),
    ("mlp.linear_fc1.weight", "mlp.c_fc.weight", "transpose"),
    ("mlp.linear_fc1.bias", "mlp.c_fc.bias", "copy"),
    ("mlp.linear_fc2.weight", "mlp.c_proj.weight", "transpose"),
    ("mlp.linear_fc2.bias", "mlp.c_proj.bias", "copy"),
)))

_L = "model.layers.{i}."
LLAMA = Table("llama", globals=(  # Llama, Mistral, Qwen2 (QKV bias), Qwen3 (QK norm)
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", _untied),
), layers=(
    Rule("self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",)),
    Rule("self_attention.linear_qkv.weight",
         tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule("self_attention.linear_qkv.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
         "qkv", lambda c: c.add_qkv_bias),
    Rule("self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), "copy",
         lambda c: c.qk_layernorm),
    Rule("self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), "copy",
         lambda c: c.qk_layernorm),
    Rule("self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
    Rule("mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",)),
    Rule("mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "glu"),
    Rule("mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",)),
))

# Mixtral (transformers' on-disk names; transformers 5 fuses the experts into
# mlp.experts.gate_up_proj / down_proj when loading and writes these names back when saving).
# Megatron's MoE layer (SequentialMLP or TEGroupedMLP) saves expert MLPs under
# mlp.experts.experts.* with an expert axis after the layer axis; w1 = gate, w3 = up, w2 = down.
_M = _L + "block_sparse_moe."
MOE_EXPERTS = "mlp.experts.experts."
MIXTRAL = Table("mixtral", globals=LLAMA.globals,
                layers=tuple(r for r in LLAMA.layers if not r.megatron.startswith("mlp.linear_fc")) + (
    Rule("mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",)),
    Rule("mlp.router.weight", (_M + "gate.weight",)),
), experts=(
    Rule(MOE_EXPERTS + "linear_fc1.weight", (_M + "experts.{e}.w1.weight", _M + "experts.{e}.w3.weight"),
         "glu"),
    Rule(MOE_EXPERTS + "linear_fc2.weight", (_M + "experts.{e}.w2.weight",)),
))


# ---- the kinds: forward (HF -> Megatron) and inverse -----------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_query_groups: int) -> torch.Tensor:
    """HF q [np·d, ...], k and v [ng·d, ...] -> Megatron fused rows [ng, (np/ng)·d + 2d, ...]."""
    import torch
    d = q.shape[0] // num_heads
    ng, rest = num_query_groups, q.shape[1:]
    grouped = (q.reshape(ng, num_heads // ng * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest))
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int) -> tuple[torch.Tensor, ...]:
    """Megatron fused QKV rows -> (q, k, v) rows, heads in order (the inverse of `fuse_qkv`)."""
    ng = num_query_groups
    per_group = num_heads // ng + 2
    d = qkv.shape[0] // (ng * per_group)
    grouped = qkv.reshape(ng, per_group * d, *qkv.shape[1:])
    q, k, v = grouped.split([(per_group - 2) * d, d, d], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def row_moves(kind: str, rows: list[int], cfg) -> list[tuple[int, int, int, int]] | None:
    """`to_megatron` of a kind that only moves rows, as row copies (HF tensor index, first row,
    end row, destination row) given each HF tensor's row count; None for the other kinds. Lets
    an import read each HF tensor straight into its place (no intermediate tensors)."""
    if kind == "copy":
        return [(0, 0, rows[0], 0)]
    if kind == "glu":
        return [(0, 0, rows[0], 0), (1, 0, rows[1], rows[0])]
    if kind == "qkv":  # fuse_qkv: per group g, [q heads of g; k_g; v_g]
        ng = cfg.query_groups
        qd, d = rows[0] // ng, rows[1] // ng
        moves = []
        for g in range(ng):
            base = g * (qd + 2 * d)
            moves += [(0, g * qd, (g + 1) * qd, base), (1, g * d, (g + 1) * d, base + qd),
                      (2, g * d, (g + 1) * d, base + qd + d)]
        return moves
    return None


def to_megatron(kind: str, hf: list[torch.Tensor], cfg, padded_vocab: int) -> torch.Tensor:
    import torch
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    if kind == "copy":
        return hf[0]
    if kind == "transpose":
        return hf[0].T
    if kind == "vocab":
        rows = hf[0]
        pad = rows.new_zeros(padded_vocab - rows.shape[0], *rows.shape[1:])
        return torch.cat([rows, pad]) if pad.shape[0] else rows
    if kind == "qkv":
        return fuse_qkv(*hf, heads, groups)
    if kind == "qkv_conv1d":
        rows = hf[0].T if hf[0].dim() == 2 else hf[0]
        return fuse_qkv(*rows.chunk(3, dim=0), heads, groups)
    if kind == "glu":
        return torch.cat(hf, dim=0)
    raise AssertionError(kind)


def to_hf(kind: str, t: torch.Tensor, cfg, vocab: int) -> list[torch.Tensor]:
    import torch
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    if kind == "copy":
        return [t]
    if kind == "transpose":
        return [t.T]
    if kind == "vocab":
        if vocab > t.shape[0]:
            raise ValueError(f"vocab_size={vocab} exceeds the checkpoint's embedding rows {t.shape[0]}")
        return [t[:vocab]]
    if kind == "qkv":
        return list(split_qkv(t, heads, groups))
    if kind == "qkv_conv1d":
        rows = torch.cat(split_qkv(t, heads, groups), dim=0)
        return [rows.T if rows.dim() == 2 else rows]
    if kind == "glu":
        return list(t.chunk(2, dim=0))
    raise AssertionError(kind)


def expected_hf_shapes(kind: str, megatron_shape: tuple[int, ...], cfg, vocab: int) -> list[tuple[int, ...]]:
    """HF shapes a rule needs, from the Megatron shape it produces (checks config.json): the
    shapes `to_hf` gives, computed without tensors."""
    s, rest = tuple(megatron_shape), tuple(megatron_shape[1:])
    if kind == "copy":
        return [s]
    if kind == "transpose":
        return [s[::-1]]
    if kind == "vocab":
        if vocab > s[0]:
            raise ValueError(f"vocab_size={vocab} exceeds the checkpoint's embedding rows {s[0]}")
        return [(vocab, *rest)]
    if kind in ("qkv", "qkv_conv1d"):  # split_qkv: per group (np/ng) q heads, a k and a v head
        ng = cfg.query_groups
        per_group = cfg.num_attention_heads // ng + 2
        d = s[0] // (ng * per_group)
        q, kv = ((per_group - 2) * d * ng, *rest), (d * ng, *rest)
        return [q, kv, kv] if kind == "qkv" else [s[::-1]]
    if kind == "glu":  # chunk(2)
        first = -(-s[0] // 2)
        return [(first, *rest), (s[0] - first, *rest)]
    raise AssertionError(kind)


def megatron_shapes(cfg, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Global shape of every Megatron model tensor (layer keys per layer, without the stack axis)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    return {
        "embedding.word_embeddings.weight": (padded_vocab, h),
        "embedding.position_embeddings.weight": (cfg.seq_length, h),
        "decoder.final_layernorm.weight": (h,), "decoder.final_layernorm.bias": (h,),
        "output_layer.weight": (padded_vocab, h),
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.linear_qkv.layer_norm_bias": (h,),
        "self_attention.linear_qkv.weight": (q + 2 * kv, h),
        "self_attention.linear_qkv.bias": (q + 2 * kv,),
        "self_attention.q_layernorm.weight": (d,), "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, q), "self_attention.linear_proj.bias": (h,),
        "mlp.linear_fc1.layer_norm_weight": (h,), "mlp.linear_fc1.layer_norm_bias": (h,),
        "mlp.linear_fc1.weight": (2 * f if cfg.gated_linear_unit else f, h),
        "mlp.linear_fc1.bias": (2 * f if cfg.gated_linear_unit else f,),
        "mlp.linear_fc2.weight": (h, f), "mlp.linear_fc2.bias": (h,),
        **_moe_shapes(cfg),
    }


def _moe_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Router and one expert's MLP (without the layer and expert axes) of an MoE model."""
    n = getattr(cfg, "num_moe_experts", None)
    if not n:
        return {}
    h, f = cfg.hidden_size, cfg.expert_ffn_hidden_size
    return {"mlp.router.weight": (n, h),
            MOE_EXPERTS + "linear_fc1.weight": (2 * f if cfg.gated_linear_unit else f, h),
            MOE_EXPERTS + "linear_fc2.weight": (h, f)}
