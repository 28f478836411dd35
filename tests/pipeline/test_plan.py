"""Plan validation (errors name key, value, rule), the example plans, and the GPU-hour accounting."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch_helpers import mini_plan_dict

from megatron_btm.pipeline.cost import plan_cost
from megatron_btm.pipeline.plan import load_plan, plan_from_dict

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("btm-*.yaml"))


def test_the_plan_uses_the_branch_stage_config(tmp_path):
    from megatron_btm.stages.branch import BranchConfig
    raw = mini_plan_dict(tmp_path)
    raw["branch"] = {"policy": "topk", "k": 3, "alpha": 0.5}   # alpha: SLURM runs can set it
    branch = plan_from_dict(raw).branch
    assert type(branch) is BranchConfig and (branch.k, branch.alpha) == (3, 0.5)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_plans_load(path):
    plan = load_plan(path)
    assert plan.cycles and all(len(c.domains) > 0 for c in plan.cycles)


@pytest.mark.parametrize("patch, key, rule", [
    ({"cluster": {"gpus_per_expert": 0}}, "cluster.gpus_per_expert", "positive integer"),
    ({"cluster": {"time_expert": "1 day"}}, "cluster.time_expert", "SLURM time limit"),
    ({"cluster": {"partiton": "gpu"}}, "cluster", "unknown key(s) ['partiton']; valid keys: ['account'"),
    ({"cluster": {"extra_sbatch": ["--qos=high\nrm -rf /"]}}, "cluster.extra_sbatch[0]", "--option"),
    ({"cluster": {"container_image": "img;reboot"}}, "cluster.container_image", "without quotes"),
    ({"branch": {"policy": "best"}}, "branch", "policy='best': valid policies are ('topk', 'all', 'uniform', 'seed')"),
    ({"executor": {"kind": "k8s"}}, "executor.kind", "valid executors: inprocess, local, slurm"),
    ({"seed": {"checkpoint": "/x", "steps": 3}}, "seed.checkpoint", "not both"),
    ({"cycles": [{"domains": ["a", "x/y"]}]}, "cycles[0].domains[1]", "[A-Za-z0-9._-]"),
    ({"cycles": [{"domains": ["a", "evil $(touch PWNED)"]}]}, "cycles[0].domains[1]", "[A-Za-z0-9._-]"),
    ({"cycles": [{"domains": ["two words"]}]}, "cycles[0].domains[0]", "[A-Za-z0-9._-]"),
    ({"cycles": [{"domains": ["seed"]}]}, "cycles[0].domains[0]", "reserved for the seed LM"),
    ({"evaluation": {"domains": ["a;b"]}}, "evaluation.domains[0]", "[A-Za-z0-9._-]"),
    ({"cycles": [{"domains": ["a"]}, {"domains": ["b", "a"]}]}, "cycles[1].domains[1]", "already trained at cycles[0].domains[0]"),
    ({"cycles": [{"domains": ["-rf"]}]}, "cycles[0].domains[0]", "starting with a letter or digit"),
    ({"cycles": [{"domains": ["a\nb"]}]}, "cycles[0].domains[0]", "[A-Za-z0-9._-]"),
    ({"cycles": [{"domains": ["a,b"]}]}, "cycles[0].domains[0]", "[A-Za-z0-9._-]"),
    ({"cycles": []}, "cycles", "non-empty list"),
    ({"seed": {"domains": ["a"], "gpu_hours": 1, "compute_fraction": 0.5}}, "seed.compute_fraction", "not both"),
    ({"seed": {"domains": ["a"], "compute_fraction": 1.0}}, "seed.compute_fraction", "[0, 1)"),
    ({"run_dir": "/tmp/my run"}, "run_dir", "whitespace"),
    ({"name": "a b"}, "name", "must match"),
    ({"overrides": {"train.steps": [1, 2]}}, "overrides.train.steps", "scalars"),
])
def test_bad_plan_names_key_and_rule(tmp_path, patch, key, rule):
    raw = mini_plan_dict(tmp_path)
    for k, v in patch.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    with pytest.raises(ValueError) as e:
        plan_from_dict(raw)
    assert repr(key) in str(e.value) and rule in str(e.value), str(e.value)


def test_missing_key_and_yaml_errors_name_the_file(tmp_path):
    raw = mini_plan_dict(tmp_path)
    del raw["seed"]
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"p\.yaml: plan key 'seed': required"):
        load_plan(f)
    f.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=r"p\.yaml: line 2, column 1: expected"):
        load_plan(f)
    with pytest.raises(FileNotFoundError, match="plan file not found"):
        load_plan(tmp_path / "absent.yaml")


def test_relative_paths_resolve_against_the_plan_file(tmp_path):
    raw = mini_plan_dict(tmp_path)
    raw.update(run_dir="out/run", data_dir="../data")
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    plan = load_plan(f)
    assert plan.run_dir == str(tmp_path / "sub" / "out" / "run") and plan.data_dir == str(tmp_path / "data")


def test_cost_of_the_64_domain_plan_matches_hand_accounting():
    plan = load_plan(REPO / "examples" / "btm-64-domains.yaml")
    cost = plan_cost(plan)
    # Independent: 16 experts per cycle at 15/40/40/20 GPU-h; seed = 0.75/0.25 x cycle 1.
    per_cycle = [16 * 15, 16 * 40, 16 * 40, 16 * 20]
    seed = 3 * per_cycle[0]
    assert [s.gpu_hours for s in cost.stages] == pytest.approx([seed, *per_cycle])
    assert cost.total_gpu_hours == pytest.approx(seed + sum(per_cycle)) == pytest.approx(2560)
    # Same order as the paper: 2565 GPU-h for the forest vs 6144 for the dense 1.3B model.
    assert abs(cost.total_gpu_hours - 2565) / 2565 < 0.01
    assert cost.fraction_of_reference == pytest.approx(2560 / 6144)
    # 16 concurrent 4-GPU experts: a 40 GPU-h expert is 10 h of wall-clock.
    assert cost.stages[2].gpus_at_once == 64 and cost.stages[2].wall_hours == pytest.approx(10)
    assert cost.dense_matched_gpu_hours == cost.total_gpu_hours
    assert cost.dense_matched_wall_hours == pytest.approx(2560 / 128)


def test_cost_waves_when_more_experts_than_the_concurrency_limit(tmp_path):
    raw = mini_plan_dict(tmp_path, domains=(tuple(f"d{i}" for i in range(5)),))
    raw["cluster"]["max_concurrent"] = 2
    raw["cycles"][0]["gpu_hours_per_expert"] = 8
    raw["seed"]["gpu_hours"] = 10
    cost = plan_cost(plan_from_dict(raw))
    assert cost.stages[1].wall_hours == pytest.approx(3 * 8 / 4)   # ceil(5/2) waves of 2 h
    assert cost.total_gpu_hours == pytest.approx(10 + 40)


def test_plan_cost_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "plan", "cost",
                          str(REPO / "examples" / "btm-64-domains.yaml"), "--output", str(tmp_path / "c.json")],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "2,560.0" in out.stdout and "41.7% of it" in out.stdout
    import json
    assert json.loads((tmp_path / "c.json").read_text())["total_gpu_hours"] == pytest.approx(2560)


def test_training_config_is_checked_before_submission(tmp_path):
    from megatron_btm.pipeline.plan import check_training
    raw = mini_plan_dict(tmp_path)
    check_training(plan_from_dict(raw))                       # the valid one passes
    raw["cycles"][1]["overrides"] = {"optim.decay_style": "zigzag"}
    with pytest.raises(ValueError, match=r"training config for cycles\[1\].*decay_style"):
        check_training(plan_from_dict(raw))


def test_inline_train_section_makes_the_plan_its_own_config(tmp_path):
    raw = mini_plan_dict(tmp_path)
    del raw["train_config"]
    raw["train"] = {"steps": 7, "model": {"num_layers": 2}}
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    plan = load_plan(f)
    assert plan.train_config is None and plan.train_config_for("seed").steps == 2   # seed.steps wins
    assert plan.train_config_for("cycle2").steps == 3 and plan.to_dict()["train"]["steps"] == 7
    raw["train_config"] = str(tmp_path / "train.yaml")
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="not both"):
        load_plan(f)
