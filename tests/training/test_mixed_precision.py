"""bf16 and fp16 training on the CPU through Megatron's Float16Module and mixed-precision optimizer.

CPU facts (torch 2.13): bf16 and fp16 matmuls, layernorm, softmax and SDPA all run on the CPU;
30 pico steps take under a second in either dtype once the process is up.
"""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import train_workers as workers  # noqa: E402

pytestmark = pytest.mark.slow  # three 30-step runs in one process: ~20 s, more under load

STEPS = 30
BF16_TOL = 0.15  # nats per step: bf16 activations/weights vs fp32 (measured max 0.08)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("dtypes")
    result = work / "result.json"
    workers.mp_workers.spawn(workers.dtype_worker, 1, str(work),
                             [[d, d, STEPS, {}] for d in ("fp32", "bf16", "fp16")], str(result))
    out = json.loads(result.read_text())
    for d in out:
        out[d]["log"] = [json.loads(line) for line in (work / d / "train_log.jsonl").read_text().splitlines()]
    return out


def _learned(losses):
    return sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_bf16_learns_and_tracks_fp32(runs):
    fp32, bf16 = runs["fp32"]["losses"], runs["bf16"]["losses"]
    assert len(bf16) == len(fp32) == STEPS
    assert _learned(fp32) and _learned(bf16)
    assert bf16 != fp32  # it really ran in bf16
    worst = max(abs(a - b) for a, b in zip(bf16, fp32))
    assert worst < BF16_TOL, f"bf16 drifts {worst:.3f} nats from fp32"
    assert abs(runs["bf16"]["valid"] - runs["fp32"]["valid"]) < BF16_TOL


def test_fp16_dynamic_loss_scale_is_applied(runs):
    """The loss is multiplied by the scale before backward (config.grad_scale_func): at 2^32 the
    fp16 gradients overflow, the scale backs off, then the model learns. Without the scale the
    gradients would never overflow, and scaled down by 2^-32 they would be below Adam's eps."""
    losses = runs["fp16"]["losses"]
    scales = [r["loss_scale"] for r in runs["fp16"]["log"] if "loss_scale" in r]
    assert len(scales) == STEPS and scales[0] <= 2.0 ** 32
    assert scales[-1] < 2.0 ** 32 / 1024  # overflows were detected on the scaled gradients
    assert all(math.isfinite(x) for x in losses)
    assert _learned(losses)
    assert not any("loss_scale" in r for r in runs["bf16"]["log"])


def test_choices_recorded_in_meta(runs):
    meta = json.loads(open(os.path.join(runs["bf16"]["checkpoint"], "meta.json")).read())
    choices = meta["device_choices"]
    assert choices["dtype"] == "bf16" and choices["device"] == "cpu" and choices["backend"] == "gloo"
    # on the CPU every GPU default stays off
    assert not any(choices["fusions"].values())
    assert not (choices["use_distributed_optimizer"] or choices["overlap_grad_reduce"]
                or choices["sequence_parallel"] or choices["pinned_prefetch"])
    fp32_meta = json.loads(open(os.path.join(runs["fp32"]["checkpoint"], "meta.json")).read())
    assert fp32_meta["device_choices"]["dtype"] == "fp32"
