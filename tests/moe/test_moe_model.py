"""Megatron-Core MoE GPTModel on the CPU backend: config, meta.json, TP=1/TP=2/EP=2 layouts."""
import json
import os
import sys

import pytest

from megatron_btm.megatron.model import MOE_FIELDS, GPTConfig

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import moe_workers  # noqa: E402
import mp_workers  # noqa: E402


def test_moe_config_round_trips_and_dense_meta_is_unchanged():
    cfg = GPTConfig(num_moe_experts=3, moe_router_topk=1, moe_aux_loss_coeff=0.1)
    data = cfg.to_dict()
    assert {k: data[k] for k in ("num_moe_experts", "moe_router_topk", "moe_aux_loss_coeff")} == \
        {"num_moe_experts": 3, "moe_router_topk": 1, "moe_aux_loss_coeff": 0.1}
    assert GPTConfig.from_dict(data) == cfg
    dense = GPTConfig().to_dict()
    assert not set(MOE_FIELDS) & set(dense)  # a dense meta.json is as before MoE
    assert GPTConfig.from_dict(dense) == GPTConfig()


@pytest.mark.parametrize("kwargs, match", [
    ({"num_moe_experts": 0}, r"model.num_moe_experts=0: must be a positive integer"),
    ({"num_moe_experts": 2, "moe_router_topk": 3}, r"moe_router_topk=3: must be an integer in \[1, num_moe_experts=2\]"),
    ({"num_moe_experts": 2, "moe_token_dispatcher_type": "flex"}, r"moe_token_dispatcher_type='flex': valid"),
    ({"num_moe_experts": 2, "moe_router_load_balancing_type": "sinkhorn"}, r"load_balancing_type='sinkhorn'"),
    ({"num_moe_experts": 2, "moe_aux_loss_coeff": -1}, r"moe_aux_loss_coeff=-1: must be >= 0"),
    ({"num_moe_experts": 2, "moe_router_score_function": "relu"}, r"score_function='relu': valid"),
    ({"num_moe_experts": 2, "moe_router_enable_expert_bias": True},
     r"expert_bias=true: .*only with model.moe_router_score_function=sigmoid"),
])
def test_moe_config_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_aux_loss_free_expert_bias_builds_with_sigmoid_scores():
    """Megatron-Core's config check takes the expert bias with sigmoid scores (the field is
    passed through to TransformerConfig)."""
    from megatron_btm.megatron.model import to_transformer_config
    cfg = GPTConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16,
                    vocab_size=64, num_moe_experts=2, moe_router_enable_expert_bias=True,
                    moe_router_score_function="sigmoid", moe_router_load_balancing_type="none")
    tc = to_transformer_config(cfg)
    assert tc.moe_router_enable_expert_bias and tc.moe_router_score_function == "sigmoid"
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_architecture_check_compares_moe_fields(tmp_path):
    from megatron_btm.averaging.apply import check_model_configs
    a = GPTConfig(num_moe_experts=2).to_dict()
    b = GPTConfig(num_moe_experts=2, moe_ffn_hidden_size=64).to_dict()
    with pytest.raises(ValueError, match="model_config.moe_ffn_hidden_size=None .* but 64"):
        check_model_configs([tmp_path / "a", tmp_path / "b"], [{"model_config": a}, {"model_config": b}])
    # routing and training knobs are not architecture: such checkpoints average
    knobs = GPTConfig(num_moe_experts=2, moe_router_topk=1, moe_aux_loss_coeff=0.1,
                      moe_token_dispatcher_type="allgather").to_dict()
    assert check_model_configs([tmp_path / "a", tmp_path / "k"], [{"model_config": a}, {"model_config": knobs}]) == a
    with pytest.raises(ValueError, match="architecture mismatch: model_config.moe_"):
        check_model_configs([tmp_path / "a", tmp_path / "c"],
                            [{"model_config": a}, {"model_config": GPTConfig().to_dict()}])


@pytest.mark.slow
@pytest.mark.parametrize("arch, dispatcher", [("gpt2", "alltoall"), ("llama", "allgather")])
def test_moe_checkpoint_loads_at_tp2_and_ep2_with_equal_logits(tmp_path, arch, dispatcher):
    result = tmp_path / "result.json"
    mp_workers.spawn(moe_workers.layouts_worker, 2, str(tmp_path), arch, dispatcher, str(result))
    out = json.loads(result.read_text())
    assert out["meta_roundtrip"]
    assert out["params"][0] == out["params"][1]  # GPTConfig.num_parameters counts the MoE
    for name in ("tp2", "ep2"):
        assert out[name]["diff"] < 1e-5, (name, out[name])
    assert out["ep2"]["router_grads"]  # a training step at EP=2 (TP=2 training needs SP)
