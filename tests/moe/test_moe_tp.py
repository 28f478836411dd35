"""MoE training at TP=2 (sequence parallelism, the CPU backend's TorchNorm and gloo collectives)
equals TP=1: losses and every parameter (and the expert bias) after 3 steps from the same
initial weights; dense sequence-parallel training too. `btm train-moe` at TP=2 through the CLI
writes a checkpoint that loads at TP=1 with the TP=2 logits."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import moe_tp_workers as workers  # noqa: E402
import mp_workers  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe-tp")
    results = {}
    for tp in (1, 2):
        out = work / f"tp{tp}.json"
        mp_workers.spawn(workers.train_worker, tp, str(work), tp, str(out))
        results[tp] = json.loads(out.read_text())
    return results


def _model_tensors(checkpoint):
    from megatron_btm.averaging.torch_dist import TorchDistReader
    reader = TorchDistReader(checkpoint)
    # optimizer keys: `optimizer.*`, or `chained_<i>.optimizer.*` where the experts have their
    # own optimizer (TP=2: moe_tp_workers / builder._mark_replicated_experts)
    return {k: reader.read_tensor(k) for k in reader.tensors() if "optimizer." not in k}


@pytest.mark.parametrize("name", list(workers.CASES))
def test_tp2_training_matches_tp1(runs, name):
    ref, got = runs[1][name], runs[2][name]
    assert len(ref["losses"]) == len(got["losses"]) == 3
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5), name
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    a, b = _model_tensors(ref["checkpoint"]), _model_tensors(got["checkpoint"])
    assert set(a) == set(b)
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    init = _model_tensors(resolve_checkpoint(ref["init"]))
    changed = {k for k in a if not (a[k] == init[k]).all()}
    norms = [k for k in a if "layer_norm" in k or "layernorm" in k]
    assert norms and set(norms) <= changed  # every norm trained (their grads reached the step)
    if name.startswith("moe"):
        assert any(".mlp.router." in k for k in changed) and any("experts" in k for k in changed)


def test_expert_bias_moves_identically_at_tp2(runs):
    ref, got = (_model_tensors(runs[tp]["moe_bias"]["checkpoint"]) for tp in (1, 2))
    key = "decoder.layers.mlp.router.expert_bias"
    assert ref[key].abs().max() > 0  # updated (3 steps of +-1e-3)
    assert (ref[key] == got[key]).all()


@pytest.mark.slow
def test_train_moe_at_tp2_through_the_cli_loads_at_tp1(corpora, tmp_path):
    import torch

    from integrity_helpers import corpus_slice
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    corpus = corpus_slice(corpora, tmp_path / "corpus", {"bible": "bible", "legal": "legal"}, 20)
    data = tmp_path / "data"
    preprocess(PreprocessConfig(corpus_dir=str(corpus), output_dir=str(data), vocab_size=300,
                                workers=1, progress=False))
    common = ["--data", str(data), "--domains", "bible,legal", "--set", "micro_batch_size=2",
              "--set", "global_batch_size=4", "--set", "eval_iters=1", "--set", "save_interval=0",
              "--set", "tensorboard=false", "--set", "progress=false", "--set", "num_threads=1"]
    seed = ["train-seed", *common, "--output", str(tmp_path / "seed"), "--set", "steps=1",
            "--set", "model.num_layers=2", "--set", "model.hidden_size=32",
            "--set", "model.num_attention_heads=4", "--set", "model.seq_length=32",
            "--set", "model.vocab_size=320", "--set", "model.num_moe_experts=4"]
    moe = ["train-moe", *common, "--checkpoint", str(tmp_path / "seed"), "--mode", "full",
           "--steps", "2", "--lr", "0.01", "--set", "parallel.tp=2", "--output", str(tmp_path / "moe")]
    at_tp2, at_tp1 = tmp_path / "tp2.pt", tmp_path / "tp1.pt"
    # the parent at DP=2, then train-moe at TP=2 (sequence parallel), in one world of 2
    mp_workers.spawn(workers.cli_worker, 2, [seed, moe], str(at_tp2))
    run = json.loads((tmp_path / "moe" / "run.json").read_text())
    assert run["device_choices"]["sequence_parallel"] is True
    assert json.loads((tmp_path / "moe" / "stage.json").read_text())["steps"] == 2
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    ckpt = resolve_checkpoint(tmp_path / "moe")
    mp_workers.spawn(workers.load_worker, 1, str(ckpt), str(at_tp1))
    tp1, tp2 = torch.load(at_tp1), torch.load(at_tp2)
    assert tp1.shape == tp2.shape and (tp1 - tp2).abs().max() < 1e-5
