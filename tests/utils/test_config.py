"""Config values as a user means them (YAML and --set), and one-line errors naming key, value, type."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_btm import errors
from megatron_btm.training.config import TrainConfig
from megatron_btm.utils.config import apply_overrides, coerce, from_dict, load_yaml, parse_override


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("3e-4", 3e-4), ("-2E5", -2e5), ("1.0e+30", 1e30), ("10_000", 10_000),
    ("0.5", 0.5), ("true", True), ("[1, 2]", [1, 2]), ("cosine", "cosine"), ("", None),
])
def test_set_values_parse_as_meant(text, value):
    key, parsed = parse_override(f"optim.lr={text}")
    assert key == ["optim", "lr"]
    assert parsed == value and type(parsed) is type(value)


def test_yaml_and_set_numbers_reach_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  min_lr: 1e-5\n  clip_grad: 1\nsteps: 10_000\n"
                    "model:\n  init_method_std: 2e-2\n")
    cfg = TrainConfig.from_yaml(path, ["optim.weight_decay=1e-1", "micro_batch_size=2",
                                       "global_batch_size=1e1"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.steps, cfg.model.init_method_std) == (3e-4, 1e-5, 10_000, 0.02)
    assert cfg.optim.weight_decay == 0.1 and cfg.global_batch_size == 10
    assert type(cfg.optim.clip_grad) is float and cfg.optim.clip_grad == 1.0  # float field, int given
    assert type(cfg.global_batch_size) is int


@pytest.mark.parametrize("override, message", [
    ("steps=ten", "config: steps='ten': expected an integer"),
    ("optim.lr=fast", "optim: lr='fast': expected a number"),
    ("recompute=maybe", "config: recompute='maybe': expected true or false"),
    ("model.num_layers=2.5", "model: num_layers=2.5: expected an integer"),
    ("parallel.sequence_parallel=3", "parallel: sequence_parallel=3: expected true or false"),
    ("dtype=[1]", "config: dtype=[1]: expected a string"),
    ("steps", "--set 'steps': expected KEY=VALUE"),
    ("optim.lr=[1, 2", "--set 'optim.lr=[1, 2': not valid YAML"),
    ("steps.x=1", "--set 'steps.x=1': steps is not a section"),
])
def test_type_errors_are_one_line_naming_key_value_and_type(override, message):
    data = {"steps": 3} if override.startswith("steps.") else {}
    with pytest.raises(errors.ConfigError) as e:
        TrainConfig.from_dict(apply_overrides(data, [override]))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # existing `except ValueError` keeps working


def test_direct_construction_is_checked_too():
    with pytest.raises(errors.ConfigError, match=r"config: recompute='maybe': expected true or false"):
        TrainConfig(recompute="maybe")
    assert TrainConfig(steps="12").steps == 12  # a quoted integer is still the integer


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\noptim:\n  lr: [0.1\n  min_lr: 0.01\n")
    with pytest.raises(errors.ConfigError) as e:
        TrainConfig.from_yaml(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: line 4, column ") and "\n" not in msg
    path.write_text("- 1\n- 2\n")
    with pytest.raises(errors.ConfigError, match="expected a mapping at the top level, got list"):
        load_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml: config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="is a folder, not a config file"):
        load_yaml(tmp_path)


@dataclasses.dataclass(kw_only=True)
class _Shapes:
    ratios: list[float] = dataclasses.field(default_factory=list)
    pair: tuple[int, ...] = ()
    limit: int | None = None
    name: str = "x"


def test_containers_optionals_and_names():
    got = from_dict(_Shapes, {"ratios": [1, "1e-3", 0.5], "pair": [1, 2.0], "limit": None,
                              "name": 2020}, "plan")
    assert got == _Shapes(ratios=[1.0, 1e-3, 0.5], pair=(1, 2), limit=None, name="2020")
    with pytest.raises(errors.ConfigError, match=r"plan: ratios\[1\]='x': expected a number"):
        from_dict(_Shapes, {"ratios": [1, "x"]}, "plan")
    with pytest.raises(errors.ConfigError, match=r"plan: limit=True: expected an integer"):
        from_dict(_Shapes, {"limit": True}, "plan")
    assert coerce(dict[str, int], {"a": "b"}, "k") == {"a": "b"}  # left to the dataclass's checks
