"""Architecture presets: fields of GPTConfig, every one compared where architectures must agree."""
import dataclasses

import pytest

from megatron_btm.megatron.model import PRESETS, GPTConfig


def test_presets_fill_unset_fields_and_explicit_fields_win(tmp_path):
    from megatron_btm.training.config import TrainConfig
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: llama\n  num_query_groups: 2\n  normalization: LayerNorm\n")
    cfg = TrainConfig.from_yaml(path, ["model.rotary_base=500000"]).model
    assert (cfg.position_embedding_type, cfg.gated_linear_unit, cfg.activation) == ("rope", True, "silu")
    assert (cfg.normalization, cfg.rotary_base, cfg.num_query_groups) == ("LayerNorm", 500000, 2)
    assert cfg.tie_embeddings is False and cfg.add_bias_linear is False
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg  # meta.json round trip
    qwen2, qwen3 = GPTConfig(arch="qwen2"), GPTConfig(arch="qwen3")
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and qwen3.qk_layernorm and not qwen3.add_qkv_bias


def test_gpt2_is_the_unchanged_default():
    default = GPTConfig()
    assert default == GPTConfig(arch="gpt2")
    assert all(getattr(default, k) == v for k, v in PRESETS["gpt2"].items())
    assert (default.position_embedding_type, default.normalization, default.activation,
            default.tie_embeddings, default.add_bias_linear) == ("learned_absolute", "LayerNorm", "gelu", True, True)
    # a meta.json written before the architecture fields existed reads as GPT-2
    old = {k: v for k, v in default.to_dict().items() if k not in PRESETS["gpt2"] and k != "arch"}
    old["tie_embeddings"] = True
    assert GPTConfig.from_dict(old) == default


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "falcon"}, r"model.arch='falcon': unknown architecture; valid: \['gpt2', 'llama', 'qwen2', 'qwen3'\]"),
    ({"normalization": "BatchNorm"}, r"model.normalization='BatchNorm': valid values are \['LayerNorm', 'RMSNorm'\]"),
    ({"activation": "relu"}, r"model.activation='relu': valid values are \['gelu', 'gelu_tanh', 'silu'\]"),
    ({"arch": "llama", "num_query_groups": 3}, "num_attention_heads=4 must be divisible by model.num_query_groups=3"),
    ({"qk_layernorm": "yes"}, r"model.qk_layernorm='yes': must be true or false"),
    ({"rotary_base": -1}, r"model.rotary_base=-1: must be a positive number"),
])
def test_bad_architecture_fields_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_every_architecture_field_is_compared():
    from megatron_btm.megatron.model import MOE_TRAINING_FIELDS
    from megatron_btm.stages.train import ARCH_FIELDS
    free = {"hidden_dropout", "attention_dropout", "init_method_std", "init_seed", "arch"} | MOE_TRAINING_FIELDS
    assert set(ARCH_FIELDS) == {f.name for f in dataclasses.fields(GPTConfig)} - free


def test_branching_and_averaging_refuse_other_architectures(tmp_path):
    from megatron_btm.averaging.apply import check_model_configs
    from megatron_btm.stages.train import check_same_architecture
    from megatron_btm.training.config import TrainConfig
    llama = GPTConfig(arch="llama").to_dict()
    untied = TrainConfig.from_dict({"model": {"tie_embeddings": False}})  # GPT-2 otherwise
    with pytest.raises(ValueError, match=r"model.position_embedding_type='rope' in the checkpoint but "
                                         r"'learned_absolute' in the config"):
        check_same_architecture(untied, {"model_config": llama}, "ckpt")
    paths = [tmp_path / "a", tmp_path / "b"]
    qwen3 = GPTConfig(arch="qwen3").to_dict()
    with pytest.raises(ValueError, match=r"architecture mismatch: model_config.layernorm_epsilon"):
        check_model_configs(paths, [{"model_config": llama}, {"model_config": qwen3}])
    # the same fields under another preset name are the same architecture
    same = dict(llama, arch="gpt2")
    assert check_model_configs(paths, [{"model_config": llama}, {"model_config": same}]) == llama
