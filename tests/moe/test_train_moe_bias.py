"""Aux-loss-free `btm train-moe` (sigmoid scores, moe_router_enable_expert_bias, no aux loss):
after every step each router's expert bias moves by Megatron's rule (DeepSeek-V3's
load-balancing update, `moe_utils.get_updated_expert_bias`, called by finalize_model_grads)
from the tokens that step routed: b_e += rate * sign(mean_j c_j - c_e), rate 1e-3, c counted
here by a forward hook on the routers; a stopped and resumed run ends with the tensors (expert
bias included) and losses of the uninterrupted one."""
import json
import sys
from pathlib import Path

import pytest

from moe_train_helpers import resume, run_worker

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import train_moe_bias_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow  # 3 pico trainings + a resume in a second process
BIAS = "decoder.layers.mlp.router.expert_bias"
RATE = 1e-3  # Megatron's default moe_router_bias_update_rate


@pytest.fixture(scope="module")
def runs(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-moe-bias")
    data = run_worker(corpora, root, "train_moe_bias_worker.py", 20)
    (root / "between").write_text("")  # its mtime: after the stopped run, before the resume
    resume(worker.moe_args(root, data, "resumed"))
    return root


def _tensors(checkpoint) -> dict:
    from megatron_btm.averaging.torch_dist import TorchDistReader
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    reader = TorchDistReader(resolve_checkpoint(checkpoint))
    return {k: reader.read_tensor(k) for k in reader.tensors() if not k.startswith("optimizer.")}


def _losses(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_expert_bias_follows_the_load_balancing_rule_each_step(runs):
    import torch
    counts = json.loads((runs / "counts.json").read_text())
    layers = sorted(counts, key=int)
    assert len(layers) == 2
    bias = [_tensors(runs / "seed")[BIAS]]  # [layers, experts], the parent's
    bias += [_tensors(runs / "bias" / "checkpoints" / f"iter_{s:07d}")[BIAS]
             for s in range(1, worker.STEPS + 1)]
    assert bias[0].shape == (2, 4) and bias[0].dtype == torch.float32
    for step in range(worker.STEPS):
        for i, layer in enumerate(layers):
            calls = counts[layer][step * worker.MICROBATCHES:(step + 1) * worker.MICROBATCHES]
            c = torch.tensor(calls, dtype=torch.float32).sum(dim=0)
            assert c.sum() == worker.TOKENS_PER_STEP * 2  # every token, top-2
            expected = bias[step][i] + torch.sign(c.mean() - c) * RATE
            assert torch.allclose(bias[step + 1][i], expected, rtol=0, atol=1e-7), \
                (step, layer, c.tolist(), bias[step][i].tolist(), bias[step + 1][i].tolist())
    assert len(counts[layers[0]]) == worker.STEPS * worker.MICROBATCHES
    assert not torch.equal(bias[-1], bias[0])  # unbalanced routing moved it


def test_bias_run_has_no_aux_loss_and_trains(runs):
    import torch
    rows = [json.loads(line) for line in (runs / "bias" / "train_log.jsonl").read_text().splitlines()]
    assert rows and all("moe/load_balancing_loss" not in r for r in rows)
    assert len(_losses(runs / "bias")) == worker.STEPS
    parent, trained = _tensors(runs / "seed"), _tensors(runs / "bias")
    assert not torch.equal(parent["decoder.layers.mlp.router.weight"],
                           trained["decoder.layers.mlp.router.weight"])


def test_stopped_and_resumed_bias_run_equals_the_uninterrupted_one(runs):
    import torch
    full, resumed = _tensors(runs / "bias"), _tensors(runs / "resumed")
    assert set(full) == set(resumed) and BIAS in full
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert _losses(runs / "bias") == _losses(runs / "resumed")
    assert json.loads((runs / "resumed" / "stage.json").read_text())["steps"] == worker.STEPS
    # it resumed, it did not start over: the checkpoints up to RESUME_AT are the stopped run's
    between = (runs / "between").stat().st_mtime
    ckpts = runs / "resumed" / "checkpoints"
    written = [(ckpts / f"iter_{s:07d}" / "meta.json").stat().st_mtime for s in range(1, worker.STEPS + 1)]
    assert all(t < between for t in written[:worker.RESUME_AT]), (written, between)
    assert all(t > between for t in written[worker.RESUME_AT:]), (written, between)
