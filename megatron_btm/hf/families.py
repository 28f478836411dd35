"""The supported Hugging Face families: config.json <-> GPTConfig, and which mapping table.

A family is an HF architecture name (`config.json: architectures`), our preset, the mapping
table and two config translations. Import reads config.json as JSON (`hf_config`: the file's
values over the config class's constructor defaults, as transformers' `from_pretrained` fills
them), so importing never loads transformers; tests/hf/test_hf_config.py checks the result against
transformers' own config classes. Fields HF can set that Megatron cannot express here
(attention output bias, sliding windows shorter than the sequence, other RoPE types, ...) are
refused by name rather than silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from megatron_btm.hf.mapping import GPT2, LLAMA, MIXTRAL, Table

# what an architecture fixes (the rest — sizes, eps, RoPE base, tying, GQA — is free)
STRUCTURAL = ("position_embedding_type", "normalization", "gated_linear_unit", "activation",
              "add_bias_linear", "add_qkv_bias", "qk_layernorm")
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Family:
    architecture: str
    """HF class name (config.json architectures[0])."""
    config_class: str
    """transformers config class."""
    preset: str
    """Our GPTConfig.arch."""
    table: Table
    from_hf: Callable[[Any, str], dict[str, Any]]
    """(transformers config, where) -> GPTConfig fields."""
    to_hf: Callable[[Any], dict[str, Any]]
    """GPTConfig -> config class kwargs (without vocab, token ids and dtype)."""
    rope_scaling: bool = False
    """Whether the HF class implements Llama-3 RoPE scaling."""
    moe: bool = False
    """A mixture-of-experts class (model.num_moe_experts set); the others are dense."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """The config class's constructor defaults of every field `from_hf` reads."""
    aliases: tuple[tuple[str, str], ...] = ()
    """The config class's attribute_map (config.json name -> attribute)."""

    def hf_config(self, raw: dict[str, Any]) -> "HFConfig":
        """config.json's values over this class's defaults (what `from_hf` reads)."""
        names = dict(self.aliases)
        return HFConfig({**dict(self.defaults), **{names.get(k, k): v for k, v in raw.items()}})


class HFConfig:
    """Attribute view of a config dict: `getattr(c, name, default)` as on a transformers config."""

    def __init__(self, values: dict[str, Any]):
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {what} is not supported (Megatron fields of this project "
                         f"cannot express it)")


def _rope(c, where: str) -> tuple[float, float | None]:
    params = getattr(c, "rope_parameters", None) or dict(getattr(c, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    _need(kind == "llama3" and all(params.get(k) == v for k, v in _LLAMA3_ROPE.items()), where,
          f"rope_type {kind!r} with {params}")
    return theta, float(params["factor"])


def _gpt2_from_hf(c, where: str) -> dict[str, Any]:
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(c.activation_function)
    _need(act is not None, where, f"activation_function={c.activation_function!r}")
    _need(c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx, where,
          "scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true")
    return dict(arch="gpt2", num_layers=c.n_layer, hidden_size=c.n_embd, num_attention_heads=c.n_head,
                ffn_hidden_size=c.n_inner or 4 * c.n_embd, seq_length=c.n_positions,
                vocab_size=c.vocab_size, layernorm_epsilon=c.layer_norm_epsilon, activation=act,
                tie_embeddings=bool(c.tie_word_embeddings), hidden_dropout=c.resid_pdrop,
                attention_dropout=c.attn_pdrop, init_method_std=c.initializer_range)


def _gpt2_to_hf(m) -> dict[str, Any]:
    return dict(n_positions=m.seq_length, n_embd=m.hidden_size, n_layer=m.num_layers,
                n_head=m.num_attention_heads, n_inner=m.ffn_hidden_size or 4 * m.hidden_size,
                activation_function="gelu_new" if m.activation == "gelu_tanh" else "gelu",
                layer_norm_epsilon=m.layernorm_epsilon, initializer_range=m.init_method_std,
                resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout, attn_pdrop=m.attention_dropout,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, tie_word_embeddings=m.tie_embeddings)


def _llama_from_hf(preset: str, qkv_bias: bool):
    def convert(c, where: str) -> dict[str, Any]:
        _need(c.hidden_act == "silu", where, f"hidden_act={c.hidden_act!r}")
        _need(not getattr(c, "mlp_bias", False), where, "mlp_bias=true")
        _need(qkv_bias or not getattr(c, "attention_bias", False), where, "attention_bias=true")
        theta, factor = _rope(c, where)
        heads = c.num_attention_heads
        groups = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        seq = c.max_position_embeddings
        window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
        if window:  # exact as long as no sequence is longer than the window
            seq = min(seq, window)
        return dict(arch=preset, num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                    num_attention_heads=heads, num_query_groups=groups if groups != heads else None,
                    kv_channels=head_dim if head_dim * heads != c.hidden_size else None,
                    ffn_hidden_size=c.intermediate_size, seq_length=seq, vocab_size=c.vocab_size,
                    layernorm_epsilon=c.rms_norm_eps, rotary_base=theta, rope_scaling_factor=factor,
                    tie_embeddings=bool(c.tie_word_embeddings),
                    attention_dropout=getattr(c, "attention_dropout", 0.0),
                    init_method_std=c.initializer_range)
    return convert


def _llama_to_hf(extra: dict[str, Any]):
    def convert(m) -> dict[str, Any]:
        scaling = None
        if m.rope_scaling_factor is not None:
            scaling = dict(_LLAMA3_ROPE, rope_type="llama3", factor=m.rope_scaling_factor)
        return dict(hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size or 4 * m.hidden_size,
                    num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                    num_key_value_heads=m.query_groups, head_dim=m.head_dim,
                    max_position_embeddings=m.seq_length, rms_norm_eps=m.layernorm_epsilon,
                    rope_theta=float(m.rotary_base), rope_scaling=scaling, hidden_act="silu",
                    tie_word_embeddings=m.tie_embeddings, attention_dropout=m.attention_dropout,
                    initializer_range=m.init_method_std, **extra)
    return convert


# Mixtral's router: softmax over all experts, top-k, renormalised over the k. Megatron's TopKRouter
# with moe_router_pre_softmax=false and score_function=softmax (its defaults, which GPTConfig
# leaves) takes the top-k logits and softmaxes over them: the same weights. Recorded on import.
MIXTRAL_ROUTER = {"moe_router_pre_softmax": False, "moe_router_score_function": "softmax",
                  "moe_router_topk_scaling_factor": None,
                  "equals": "softmax over all experts, top-k, renormalised (Mixtral)"}


def _mixtral_from_hf(c, where: str) -> dict[str, Any]:
    fields = _llama_from_hf("llama", False)(c, where)
    return dict(fields, num_moe_experts=c.num_local_experts, moe_router_topk=c.num_experts_per_tok,
                moe_aux_loss_coeff=float(getattr(c, "router_aux_loss_coef", 0.0)))


def _mixtral_to_hf(m) -> dict[str, Any]:
    fields = _llama_to_hf({"sliding_window": None})(m)
    return dict(fields, intermediate_size=m.expert_ffn_hidden_size, num_local_experts=m.num_moe_experts,
                num_experts_per_tok=m.moe_router_topk, router_aux_loss_coef=m.moe_aux_loss_coeff)


def _defaults(base: dict[str, Any], **changes: Any) -> tuple[tuple[str, Any], ...]:
    return tuple({**base, **changes}.items())


# constructor defaults (transformers 5.x) of the fields from_hf reads
_GPT2_DEFAULTS = dict(activation_function="gelu_new", scale_attn_weights=True,
                      scale_attn_by_inverse_layer_idx=False, n_layer=12, n_embd=768, n_head=12,
                      n_inner=None, n_positions=1024, vocab_size=50257, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, resid_pdrop=0.1, attn_pdrop=0.1, initializer_range=0.02)
_LLAMA_DEFAULTS = dict(vocab_size=32000, tie_word_embeddings=False, initializer_range=0.02,
                       hidden_act="silu", rope_parameters=None, rope_scaling=None, rope_theta=10000.0,
                       num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                       hidden_size=4096, max_position_embeddings=2048, num_hidden_layers=32,
                       intermediate_size=11008, rms_norm_eps=1e-6, attention_dropout=0.0)
_QWEN_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=151936, num_key_value_heads=32,
                      max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False,
                      intermediate_size=22016)

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("GPT2LMHeadModel", "GPT2Config", "gpt2", GPT2, _gpt2_from_hf, _gpt2_to_hf,
           defaults=_defaults(_GPT2_DEFAULTS),
           aliases=(("hidden_size", "n_embd"), ("max_position_embeddings", "n_positions"),
                    ("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer"))),
    Family("LlamaForCausalLM", "LlamaConfig", "llama", LLAMA, _llama_from_hf("llama", False),
           _llama_to_hf({"attention_bias": False, "mlp_bias": False}), rope_scaling=True,
           defaults=_defaults(_LLAMA_DEFAULTS, mlp_bias=False, attention_bias=False)),
    Family("MistralForCausalLM", "MistralConfig", "llama", LLAMA, _llama_from_hf("llama", False),
           _llama_to_hf({"sliding_window": None}),
           defaults=_defaults(_LLAMA_DEFAULTS, num_key_value_heads=8, max_position_embeddings=131072,
                              sliding_window=4096, intermediate_size=14336)),
    Family("Qwen2ForCausalLM", "Qwen2Config", "qwen2", LLAMA, _llama_from_hf("qwen2", True),
           _llama_to_hf({"use_sliding_window": False}), defaults=_defaults(_QWEN_DEFAULTS)),
    Family("Qwen3ForCausalLM", "Qwen3Config", "qwen3", LLAMA, _llama_from_hf("qwen3", False),
           _llama_to_hf({"attention_bias": False, "use_sliding_window": False}),
           defaults=_defaults(_QWEN_DEFAULTS, head_dim=128, attention_bias=False)),
    Family("MixtralForCausalLM", "MixtralConfig", "llama", MIXTRAL, _mixtral_from_hf, _mixtral_to_hf,
           moe=True, aliases=(("num_experts", "num_local_experts"),),
           defaults=_defaults(_LLAMA_DEFAULTS, num_key_value_heads=8, max_position_embeddings=131072,
                              sliding_window=None, intermediate_size=14336, rms_norm_eps=1e-5,
                              rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2,
                              router_aux_loss_coef=0.001)),
)}
# export picks the first family whose structure matches (Mistral only when asked for)
AUTO_ORDER = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
              "MixtralForCausalLM")


_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "mixtral": "MixtralForCausalLM"}


def for_architectures(architectures: list[str] | None, where: str, model_type: str | None = None) -> Family:
    """The family of config.json's `architectures` (or, when it has none, its `model_type`)."""
    archs = list(architectures or [])
    for name in archs:
        if name in FAMILIES:
            return FAMILIES[name]
    if not archs and model_type in _MODEL_TYPES:
        return FAMILIES[_MODEL_TYPES[model_type]]
    raise ValueError(f"{where}: architectures={archs} (model_type={model_type!r}) is not supported; "
                     f"supported: {sorted(FAMILIES)}")


def mismatch(family: Family, cfg) -> str | None:
    """The first field of `cfg` this family cannot represent ("field=value"), or None."""
    from megatron_btm.megatron.model import PRESETS
    want = PRESETS[family.preset]
    experts = getattr(cfg, "num_moe_experts", None)
    if bool(experts) != family.moe:
        return f"num_moe_experts={experts!r}"
    for name in STRUCTURAL:
        ok = getattr(cfg, name) == want[name]
        if name == "activation" and family.preset == "gpt2":
            ok = cfg.activation in ("gelu", "gelu_tanh")
        if not ok:
            return f"{name}={getattr(cfg, name)!r}"
    if family.preset == "gpt2" and (cfg.query_groups != cfg.num_attention_heads
                                    or cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size):
        return f"num_query_groups={cfg.num_query_groups!r} / kv_channels={cfg.kv_channels!r}"
    if cfg.rope_scaling_factor is not None and not family.rope_scaling:
        return f"rope_scaling_factor={cfg.rope_scaling_factor!r}"
    return None


def for_config(cfg, architecture: str | None = None) -> Family:
    """The family to export `cfg` as: `architecture` if given (checked), else the first match."""
    if architecture is not None:
        if architecture not in FAMILIES:
            raise ValueError(f"architecture={architecture!r}: supported: {sorted(FAMILIES)}")
        bad = mismatch(FAMILIES[architecture], cfg)
        if bad:
            raise ValueError(f"architecture={architecture}: cannot represent model {bad}")
        return FAMILIES[architecture]
    for name in AUTO_ORDER:
        if mismatch(FAMILIES[name], cfg) is None:
            return FAMILIES[name]
    if getattr(cfg, "num_moe_experts", None) and cfg.normalization == "LayerNorm":
        raise ValueError("a GPT-2-style MoE (LayerNorm, GELU, learned positions) has no Hugging Face "
                         "class to export to (docs/INTEROP.md, 'MoE export'); evaluate it with btm eval")
    raise ValueError(f"no supported Hugging Face family represents this model "
                     f"({', '.join(f'{n}: {mismatch(FAMILIES[n], cfg)}' for n in AUTO_ORDER)})")
