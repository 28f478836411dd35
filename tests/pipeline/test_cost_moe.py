"""`btm plan cost` of a plan's `moe:` stages (merge-moe, each train-moe run) on a hand-computed
pico case, and a plan without the section: exactly what it printed before (golden)."""
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import mini_plan_dict

from megatron_btm.pipeline.cost import format_cost, plan_cost
from megatron_btm.pipeline.plan import load_plan, plan_from_dict

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "btm-64-domains.cost.txt"

# mini_plan_dict's model (GPT-2 preset): hidden 32, 2 layers, vocab 8192, seq 128, biases.
H, L = 32, 2
ATTN = 4 * H * H + 4 * H                       # QKV + projection with biases: 4224
NORMS = 2 * 2 * H                               # two LayerNorms per layer: 128
MLP = 8 * H * H + 5 * H                         # fc1 [4h, h] + fc2 [h, 4h] with biases: 8352
EMB, FINAL = 8192 * H + 128 * H, 2 * H          # word + position embeddings, final LayerNorm
DENSE = EMB + L * (ATTN + NORMS + MLP) + FINAL  # 291,712
N, K = 3, 2                                     # experts a, b, c; top-2
ROUTER = L * N * (H + 1)                        # per layer [n, h] + bias [n]: 198
MOE = EMB + L * (ATTN + NORMS + N * MLP) + FINAL + ROUTER
ACTIVE = MOE - L * (N - K) * MLP                # the expert MLP a token skips, in each layer
RATE = 0.001e12 * 0.5                           # peak 1 GFLOP/s x MFU 0.5
TOKENS_PER_STEP = 8 * 128                       # global batch 8 x seq 128
OVERHEAD = 30


def _plan(tmp_path, cost=None, **moe):
    raw = mini_plan_dict(tmp_path, domains=(("a", "b", "c"),))
    raw["moe"] = {"topk": K, "num_sequences": 4,
                  "train": [{"mode": "router-only", "steps": 2}, {"mode": "full", "steps": 4}], **moe}
    raw["cost"] = cost or {"peak_tflops": 0.001, "mfu": 0.5, "job_overhead_s": OVERHEAD}
    return plan_from_dict(raw)


def test_moe_rows_match_hand_accounting(tmp_path):
    assert (DENSE, MOE, ACTIVE) == (291_712, 325_318, 308_614)
    c = plan_cost(_plan(tmp_path))
    merge, router_only, full = c.moe_stages
    assert [r.stage for r in c.moe_stages] == ["merge-moe", "train-moe-router-only", "train-moe-full"]
    assert [r.source for r in c.moe_stages] == ["io", "throughput", "throughput"]
    assert merge.parameters == MOE and full.active_parameters == router_only.active_parameters == ACTIVE
    # router-only: forward 2A + activation gradients 2A + the routers' weight gradients 2R
    assert router_only.flops_per_token == 4 * ACTIVE + 2 * ROUTER == 1_234_852
    assert full.flops_per_token == 6 * ACTIVE
    ro_s = 2 * TOKENS_PER_STEP * (4 * ACTIVE + 2 * ROUTER) / RATE + OVERHEAD
    full_s = 4 * TOKENS_PER_STEP * 6 * ACTIVE / RATE + OVERHEAD
    assert router_only.tokens_per_expert == 2 * TOKENS_PER_STEP
    assert router_only.gpu_hours == pytest.approx(ro_s * 4 / 3600)   # 1 rank, charged 4 GPUs
    assert full.gpu_hours == pytest.approx(full_s * 4 / 3600) and full.wall_hours == pytest.approx(full_s / 3600)
    # merge-moe (router hidden): the forward of the top-n MoE over 4 blocks of 128 per domain, 1 GPU;
    # it reads 3 experts + the uniform-router MoE back, writes that and the result (2 bytes each)
    merge_s = N * 4 * 128 * 2 * MOE / RATE + OVERHEAD
    assert merge.gpu_hours == pytest.approx(merge_s / 3600) and merge.gpus_at_once == 1
    assert (merge.bytes_read, merge.bytes_written) == ((N * DENSE + MOE) * 2, 2 * MOE * 2)
    forest = c.stages
    assert c.total_gpu_hours == pytest.approx(sum(s.gpu_hours for s in forest + c.moe_stages))
    # the train runs are jobs of their own after the merge: they run at once
    assert c.wall_hours == pytest.approx(sum(s.wall_hours for s in forest) + (merge_s + full_s) / 3600)
    assert c.dense_matched_gpu_hours == c.total_gpu_hours


def test_random_router_merge_is_io_only_and_stated_throughput_scales_by_flops(tmp_path):
    c = plan_cost(_plan(tmp_path, {"tokens_per_second_per_gpu": 256}, router="random"))
    merge, router_only, _ = c.moe_stages
    assert merge.gpu_hours == 0 and merge.bytes_read == N * DENSE * 2 and merge.bytes_written == MOE * 2
    rate = 256 * 6 * DENSE   # the FLOP rate of the dense model at the stated throughput
    assert router_only.gpu_hours == pytest.approx(
        2 * TOKENS_PER_STEP * (4 * ACTIVE + 2 * ROUTER) / rate * 4 / 3600)


def test_without_cost_section_the_moe_rows_have_no_budget(tmp_path):
    raw = mini_plan_dict(tmp_path, domains=(("a", "b"),))
    raw["cycles"][0]["gpu_hours_per_expert"] = 2.0
    raw["seed"]["gpu_hours"] = 1.0
    raw["moe"] = {"train": [{"mode": "full", "steps": 2}]}
    c = plan_cost(plan_from_dict(raw))
    assert [r.source for r in c.moe_stages] == ["none", "none"] and c.total_gpu_hours is None
    text = format_cost(c)
    assert "which the moe stages need" in text and "train-moe-full" in text


def test_a_plan_without_moe_prints_what_it_printed_before(tmp_path):
    cost = plan_cost(load_plan(REPO / "examples" / "btm-64-domains.yaml"))
    assert format_cost(cost) == GOLDEN.read_text()
    assert "moe_stages" not in cost.to_dict()


def test_plan_cost_cli_of_the_moe_example():
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "plan", "cost",
                          str(REPO / "examples" / "btm-moe-mini.yaml")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(x.startswith("merge-moe ") for x in lines) and any(x.startswith("train-moe-full ") for x in lines)
