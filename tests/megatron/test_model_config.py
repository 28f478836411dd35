import pytest

from megatron_btm.megatron.model import GPTConfig
from megatron_btm.training.config import TrainConfig, apply_override


def test_padded_vocab_is_independent_of_tp():
    cfg = GPTConfig(vocab_size=8000)
    assert cfg.padded_vocab_size(1) == cfg.padded_vocab_size(2) == cfg.padded_vocab_size(4) == 8064
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size 3"):
        cfg.padded_vocab_size(3)


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size=30 must be divisible"),
    ({"num_layers": 0}, r"model.num_layers=0: must be a positive integer"),
    ({"hidden_dropout": 1.5}, r"model.hidden_dropout=1.5: must be in \[0, 1\)"),
])
def test_model_config_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_train_config_validation_and_overrides(tmp_path):
    with pytest.raises(ValueError, match=r"config: unknown key\(s\) \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="global_batch_size=10 must be a multiple of micro_batch_size=4"):
        TrainConfig(global_batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match=r"model: unknown key\(s\) \['layers'\]"):
        TrainConfig.from_dict({"model": {"layers": 2}})
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 4\nsteps: 7\n")
    cfg = TrainConfig.from_yaml(path, ["model.hidden_size=32", "optim.lr=0.01", "parallel.tp=2"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.steps, cfg.optim.lr, cfg.parallel.tp) == (4, 32, 7, 0.01, 2)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        apply_override({}, "steps")
    with pytest.raises(FileNotFoundError, match="missing.yaml: config file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="world size 3 is not divisible by tp×pp = 2×1"):
        cfg.parallel.data_parallel_size(3)
