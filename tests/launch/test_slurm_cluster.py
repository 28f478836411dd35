"""The generated scripts under the real scheduler (project's local cluster, fake GPUs), with a
fake `btm` that records timestamps / CUDA_VISIBLE_DEVICES and sleeps: tests the launcher, the
dependency chain and the cluster, not training."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_helpers import fakebtm, job_state, mini_plan_dict, wait_idle

from megatron_btm.launch import runner
from megatron_btm.launch.plan import plan_from_dict
from megatron_btm.utils.io import read_json

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def _all_ids(plan) -> list[str]:
    st = read_json(runner.state_path(plan))
    return [s["job_id"] for subs in st["stages"].values() for s in subs]


def test_local_cluster_has_64_fake_gpus(slurm_cluster):
    # 16 nodes x gpu:4 (sinfo %D %G)
    assert slurm_cluster.split()[0] == "16" and "gpu:4" in slurm_cluster


def test_sixteen_concurrent_4gpu_experts(slurm_cluster, tmp_path):
    fake = tmp_path / "fake"
    domains = [f"d{i:02d}" for i in range(16)]
    plan = plan_from_dict(mini_plan_dict(tmp_path, fake, domains=(tuple(domains),), sleep=1,
                                         barrier=16))
    runner.submit(plan)
    wait_idle(_all_ids(plan), timeout=180)
    calls = fakebtm.read_calls(fake)
    train = [c for c in calls if c["argv"][0] == "train-expert"]
    assert sorted(c["argv"][c["argv"].index("--domain") + 1] for c in train) == domains
    # Each task waited until all 16 were running (barrier), and by the tasks' own clocks the 16
    # intervals share a common instant: max(start) < min(end).
    assert all(c["barrier_ok"] for c in train)
    assert max(c["start"] for c in train) < min(c["end"] for c in train), \
        sorted((c["start"], c["end"]) for c in train)
    # Each task has a node of its own and sees that node's 4 fake GPUs.
    assert len({c["node"] for c in train}) == 16
    assert all(c["cvd"] == "0,1,2,3" for c in train), [c["cvd"] for c in train]
    assert len({c["master_port"] for c in train}) == 16 and {c["master_addr"] for c in train} == {"127.0.0.1"}
    # Order: seed train + seed merge < branch < every expert < 16 merges.
    order = [c["argv"][0] for c in sorted(calls, key=lambda c: c["start"])]
    assert order == ["train-seed", "merge", "branch"] + ["train-expert"] * 16 + ["merge"]
    assert fakebtm.merged(calls) == [(d, "1") for d in domains]
    merge = max(calls, key=lambda c: c["start"])
    assert merge["argv"][0] == "merge" and merge["start"] >= max(c["end"] for c in train)
    assert runner.status(plan).complete()


def _cli(*args):
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *args], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def _domain(call):
    return call["argv"][call["argv"].index("--domain") + 1]


def test_failed_expert_cancels_merge_status_names_it_resume_reruns_only_it(slurm_cluster, tmp_path):
    fake = tmp_path / "fake"
    raw = mini_plan_dict(tmp_path, fake, domains=(("a", "b", "c", "d"), ("e", "f")))
    plan = plan_from_dict(raw)
    plan_yaml = tmp_path / "plan.yaml"
    plan_yaml.write_text(yaml.safe_dump(raw))
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "fail_domains").write_text("b\n")
    sub = _cli("launch", "slurm", str(plan_yaml))
    assert "submitted cycle1-merge" in sub.stdout
    wait_idle(_all_ids(plan), timeout=120)
    stages = read_json(runner.state_path(plan))["stages"]
    # The merge never ran: cancelled (kill-on-invalid-dep), as is everything after it.
    assert job_state(stages["cycle1-merge"][0]["job_id"]) == "CANCELLED"
    assert job_state(stages["cycle2-branch"][0]["job_id"]) == "CANCELLED"
    calls = fakebtm.read_calls(fake)
    assert fakebtm.merged(calls) == []
    assert sorted(_domain(c) for c in calls if c["argv"][0] == "train-expert") == ["a", "b", "c", "d"]

    st = runner.status(plan)
    assert [(u.stage, u.domain, u.state, u.exit_code) for u in st.failed_experts()] == [
        ("cycle1-train", "b", "FAILED", "3:0")]
    assert {u.domain: u.state for u in st.units if u.stage == "cycle1-train"} == {
        "a": "COMPLETED", "b": "FAILED", "c": "COMPLETED", "d": "COMPLETED"}
    assert {u.domain for u in st.units if u.cancelled_by_dependency} == {None, "e", "f"}
    out = _cli("launch", "status", str(plan_yaml))
    assert "failed experts: cycle1 'b' (job " in out.stdout and "FAILED" in out.stdout

    (fake / "fail_domains").unlink()
    res = _cli("launch", "resume", str(plan_yaml))
    assert res.stdout.strip() == ("resubmitted: cycle1-train:b, cycle1-merge, cycle2-branch, "
                                  "cycle2-train:e, cycle2-train:f, cycle2-merge")
    wait_idle(_all_ids(plan), timeout=120)
    calls = fakebtm.read_calls(fake)
    trained = sorted(_domain(c) for c in calls if c["argv"][0] == "train-expert")
    assert trained == ["a", "b", "b", "c", "d", "e", "f"]      # only b ran twice
    assert fakebtm.merged(calls) == [("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "2"), ("f", "2")]
    assert runner.status(plan).complete()
    assert "run complete" in _cli("launch", "status", str(plan_yaml)).stdout


def test_requeued_expert_restarts_with_resume_and_merge_waits(slurm_cluster, tmp_path):
    fake = tmp_path / "fake"
    plan = plan_from_dict(mini_plan_dict(tmp_path, fake, domains=(("a", "b"),), sleep=4))
    runner.submit(plan)
    stages = read_json(runner.state_path(plan))["stages"]
    task_b = f"{stages['cycle1-train'][0]['job_id']}_1"
    deadline = time.time() + 60
    while not list(fake.glob("started-*")) or job_state(task_b) != "RUNNING":
        assert time.time() < deadline, "expert b never started"
        time.sleep(0.2)
    time.sleep(1)
    subprocess.run(["scontrol", "requeue", task_b], check=True)
    wait_idle(_all_ids(plan), timeout=120)
    calls = fakebtm.read_calls(fake)
    b = [c for c in calls if c["argv"][0] == "train-expert" and _domain(c) == "b"]
    assert [c["restart"] for c in b] == ["1"]                # the killed first run never finished
    assert "--resume" in b[0]["argv"] and b[0]["argv"][b[0]["argv"].index("--resume") + 1] == "auto"
    merge = [c for c in calls if c["argv"][0] == "merge" and "--cycle" in c["argv"]]
    assert fakebtm.merged(merge) == [("a", "1"), ("b", "1")] and merge[0]["start"] >= b[0]["end"]
    log = next((tmp_path / "run" / "logs").glob("btm-mini-c1-train-*_1.out"))
    assert log.exists()   # --open-mode=append: one log across the requeue
    assert runner.status(plan).complete()
