"""A resumed run must be the run of its run.json; a tiny domain read many times is warned."""
import json

import pytest

from megatron_btm.errors import ConfigError, TokenizerError
from megatron_btm.stages import run_checks
from megatron_btm.training.config import TrainConfig


def _run_json(tmp_path, cfg, blend, sha="a" * 64):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"kind": "seed", "blend": blend, "tokenizer_sha256": sha,
                                "model_config": cfg.model.to_dict(), "train_config": cfg.to_dict()}))
    return path, json.loads(path.read_text())


def _now(cfg, blend, sha="a" * 64):
    return run_checks.run_identity(cfg, blend=blend, tokenizer_sha256=sha, kind="seed")


def test_same_run_resumes_and_logging_may_change(tmp_path):
    cfg = TrainConfig.from_yaml(None, ["steps=40"])
    path, run = _run_json(tmp_path, cfg, {"bible": 1.0, "legal": 1.0})
    quiet = TrainConfig.from_yaml(None, ["steps=40", "progress=false", "log_interval=5"])
    assert run_checks.check_resume(path, run, _now(quiet, {"bible": 1.0, "legal": 1.0})) == []


@pytest.mark.parametrize("sets, blend, keys", [
    (["steps=400"], {"bible": 1.0, "legal": 1.0}, "steps"),
    (["steps=40"], {"code_c": 1.0}, "blend"),
    (["steps=40", "model.hidden_size=128"], {"bible": 1.0, "legal": 1.0}, "model.hidden_size"),
    (["steps=40", "optim.lr=0.1"], {"bible": 1.0, "legal": 1.0}, "optim.lr"),
])
def test_a_changed_run_is_refused_naming_the_keys(tmp_path, sets, blend, keys):
    cfg = TrainConfig.from_yaml(None, ["steps=40"])
    path, run = _run_json(tmp_path, cfg, {"bible": 1.0, "legal": 1.0})
    with pytest.raises(ConfigError, match=rf"{path}.*different {keys} "):
        run_checks.check_resume(path, run, _now(TrainConfig.from_yaml(None, sets), blend))


def test_allow_change_lets_a_safe_change_through_and_reports_it(tmp_path):
    cfg = TrainConfig.from_yaml(None, ["steps=40"])
    path, run = _run_json(tmp_path, cfg, {"bible": 1.0})
    now = _now(TrainConfig.from_yaml(None, ["steps=80"]), {"bible": 1.0})
    assert run_checks.check_resume(path, run, now, ["steps"]) == [
        {"key": "steps", "old": 40, "new": 80}]
    arch = _now(TrainConfig.from_yaml(None, ["steps=40", "model.num_layers=4"]), {"bible": 1.0})
    with pytest.raises(ConfigError, match="cannot change in a run"):  # never allowed
        run_checks.check_resume(path, run, arch, ["model.num_layers"])


def test_another_tokenizer_is_refused(tmp_path):
    cfg = TrainConfig.from_yaml(None, [])
    path, run = _run_json(tmp_path, cfg, {"bible": 1.0})
    with pytest.raises(TokenizerError, match="aaaa.*bbbb"):
        run_checks.check_resume(path, run, _now(cfg, {"bible": 1.0}, sha="b" * 64))


def test_tiny_domain_repeated_many_times_is_warned(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    (tmp_path / "tiny").mkdir()
    builder = IndexedDatasetBuilder(str(tmp_path / "tiny" / "train.bin"),
                                    dtype=DType.optimal_dtype(400))
    builder.add_document(torch.arange(12, dtype=torch.int64), [12])
    builder.finalize(str(tmp_path / "tiny" / "train.idx"))
    with pytest.warns(UserWarning, match=r"'tiny'.*12 tokens.*repeats ~\d+ times"):
        run_checks.warn_repeats(tmp_path, {"tiny": 1.0}, samples=40 * 8, seq_length=64)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_checks.warn_repeats(tmp_path, {"tiny": 1.0}, samples=1, seq_length=8)  # < 4x: quiet
