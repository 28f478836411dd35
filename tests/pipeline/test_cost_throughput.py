"""`btm plan cost` from a plan's `cost:` section: tokens of each stage at a stated or
FLOP-derived throughput per GPU, plus a per-job overhead, on hand-computed numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import mini_plan_dict

from megatron_btm.pipeline.cost import plan_cost
from megatron_btm.pipeline.plan import plan_from_dict

REPO = Path(__file__).resolve().parents[2]
# mini_plan_dict's training config: global batch 8 x seq 128 = 1024 tokens per step; the cycles
# train 3 steps per expert (3072 tokens), the seed 2 steps (2048 tokens); 4 GPUs per expert job
# computing on 1 rank (ntasks_per_expert 1), the seed on 1 node x 1 rank holding 4 GPUs.
EXPERT_TOKENS, SEED_TOKENS = 3 * 8 * 128, 2 * 8 * 128


def _cost(tmp_path, cost: dict, **cluster):
    raw = mini_plan_dict(tmp_path, domains=(("a", "b", "c"), ("d", "e")), **cluster)
    raw["cost"] = cost
    return plan_cost(plan_from_dict(raw))


def test_stated_throughput_and_overhead(tmp_path):
    c = _cost(tmp_path, {"tokens_per_second_per_gpu": 256, "job_overhead_s": 30})
    expert_s = EXPERT_TOKENS / 256 + 30             # 12 s of training + 30 s of overhead
    seed_s = SEED_TOKENS / 256 + 30
    seed, c1, c2 = c.stages
    assert [s.source for s in c.stages] == ["throughput"] * 3
    assert c1.tokens_per_expert == EXPERT_TOKENS and seed.tokens_per_expert == SEED_TOKENS
    assert c1.gpu_hours_per_expert == pytest.approx(expert_s * 4 / 3600)   # charged its 4 GPUs
    assert c1.gpu_hours == pytest.approx(3 * expert_s * 4 / 3600)
    assert c1.wall_hours == pytest.approx(expert_s / 3600)                   # 3 experts at once
    assert c2.gpu_hours == pytest.approx(2 * expert_s * 4 / 3600)
    assert seed.gpu_hours == pytest.approx(seed_s * 4 / 3600)
    assert c.total_gpu_hours == pytest.approx((5 * expert_s + seed_s) * 4 / 3600)


def test_ranks_waves_and_seed_nodes(tmp_path):
    c = _cost(tmp_path, {"tokens_per_second_per_gpu": 256}, ntasks_per_expert=4, max_concurrent=2,
              seed_nodes=2, seed_ntasks_per_node=4)
    expert_s = EXPERT_TOKENS / (256 * 4)           # 4 ranks compute: 3 s
    seed, c1, _ = c.stages
    assert c1.gpu_hours_per_expert == pytest.approx(expert_s * 4 / 3600)
    assert c1.wall_hours == pytest.approx(2 * expert_s / 3600)              # 3 experts, 2 at once
    assert seed.gpus_at_once == 8
    assert seed.wall_hours == pytest.approx(SEED_TOKENS / (256 * 8) / 3600)
    assert seed.gpu_hours == pytest.approx(seed.wall_hours * 8)


def test_throughput_from_peak_and_mfu(tmp_path):
    # hidden 32, 2 layers, vocab 8192, seq 128, tied embeddings, biases: 262144 word + 4096
    # position + 2 x 12704 per layer + 64 final LayerNorm = 291712 parameters
    params = 8192 * 32 + 128 * 32 + 2 * (128 + 3168 + 1056 + 4224 + 4128) + 64
    assert params == 291_712
    c = _cost(tmp_path, {"peak_tflops": 0.001, "mfu": 0.5})
    tps = 0.001e12 * 0.5 / (6 * params)
    assert c.stages[1].gpu_hours_per_expert == pytest.approx(EXPERT_TOKENS / tps * 4 / 3600)


def test_peak_throughput_counts_a_llama_model_as_its_config_does(tmp_path):
    # Llama preset: RMSNorm (weight only), SwiGLU without biases, untied output, RoPE (no
    # position table): 2 x (2*32 norms + 4*32*32 attention + 3*32*128 MLP) + 2 * 8192*32
    # embedding/output + 32 final norm = 557,216 parameters (GPT-2's count would give 291,712)
    (tmp_path / "train.yaml").write_text("steps: 3\nmodel: {num_layers: 2, hidden_size: 32, "
                                         "arch: llama}\n")
    raw = mini_plan_dict(tmp_path, domains=(("a", "b", "c"), ("d", "e")))
    raw["cost"] = {"peak_tflops": 0.001, "mfu": 0.5}
    params = 2 * (2 * 32 + 4 * 32 * 32 + 3 * 32 * 128) + 2 * 8192 * 32 + 32
    assert params == 557_216
    c = plan_cost(plan_from_dict(raw))
    tps = 0.001e12 * 0.5 / (6 * params)
    assert c.stages[1].gpu_hours_per_expert == pytest.approx(EXPERT_TOKENS / tps * 4 / 3600)


def test_stated_budgets_win_and_compute_fraction_without_a_cost_section(tmp_path):
    raw = mini_plan_dict(tmp_path, domains=(("a", "b"),))
    raw["cycles"][0]["gpu_hours_per_expert"] = 2.0
    raw["seed"]["compute_fraction"] = 0.75
    c = plan_cost(plan_from_dict(raw))              # no cost section: the paper's seed rule
    assert [s.source for s in c.stages] == ["compute_fraction", "stated"]
    assert c.stages[0].gpu_hours == pytest.approx(3 * 4.0)
    raw["cost"] = {"tokens_per_second_per_gpu": 256}
    c = plan_cost(plan_from_dict(raw))              # the seed's own steps now; the cycle as stated
    assert [s.source for s in c.stages] == ["throughput", "stated"]
    assert c.stages[0].gpu_hours == pytest.approx(SEED_TOKENS / 256 * 4 / 3600)
    assert c.stages[1].gpu_hours == pytest.approx(4.0)


@pytest.mark.parametrize("cost, match", [
    ({"tokens_per_second_per_gpu": 0}, "tokens_per_second_per_gpu"),
    ({"tokens_per_second_per_gpu": "fast"}, "tokens_per_second_per_gpu"),
    ({"peak_tflops": 100}, "give both"),
    ({"peak_tflops": 100, "mfu": 1.5}, "mfu"),
    ({"tokens_per_second_per_gpu": 10, "peak_tflops": 100, "mfu": 0.3}, "not both"),
    ({"tokens_per_second_per_gpu": 10, "job_overhead_s": -1}, "job_overhead_s"),
    ({"tokens_per_sec": 10}, "tokens_per_sec"),
])
def test_bad_cost_section_is_one_line_naming_the_key(tmp_path, cost, match):
    raw = mini_plan_dict(tmp_path)
    raw["cost"] = cost
    with pytest.raises(ValueError, match=match) as e:
        plan_from_dict(raw)
    assert "\n" not in str(e.value)


def test_the_elm64_mini_plan_has_no_unknown_stage(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "plan", "cost", "--output",
                          str(tmp_path / "c.json"), str(REPO / "examples" / "elm64-mini.yaml")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "?" not in out.stdout
    stages = json.loads((tmp_path / "c.json").read_text())["stages"]
    assert [s["source"] for s in stages] == ["throughput"] * 5          # seed + 4 cycles
    assert [s["tokens_per_expert"] for s in stages] == [192 * 4 * 64] + [4 * 4 * 64] * 4
