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

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import slurm_executor as runner
from megatron_btm.pipeline.plan import plan_from_dict
from megatron_btm.pipeline.run import status
from megatron_btm.utils.io import read_json

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def _all_ids(plan) -> list[str]:
    st = read_json(runner.state_path(plan))
    return [s["job_id"] for subs in st["jobs"].values() for s in subs]


def _submit(plan):
    return runner.submit(plan, G.build_graph(plan))


def _complete(plan) -> bool:
    return status(plan)[0].rstrip().endswith("run complete")


def test_local_cluster_has_64_fake_gpus(slurm_cluster):
    # 16 nodes x gpu:4 (sinfo %D %G)
    assert slurm_cluster.split()[0] == "16" and "gpu:4" in slurm_cluster


def test_sixteen_concurrent_4gpu_experts(slurm_cluster, tmp_path):
    fake = tmp_path / "fake"
    domains = [f"d{i:02d}" for i in range(16)]
    plan = plan_from_dict(mini_plan_dict(tmp_path, fake, domains=(tuple(domains),), sleep=1,
                                         barrier=16))
    _submit(plan)
    wait_idle(_all_ids(plan), timeout=180)
    calls = fakebtm.read_calls(fake)
    train = [c for c in calls if c["kind"] == "train"]
    assert sorted(fakebtm.trained(calls)) == domains
    # Each task waited until all 16 were running (barrier), and by the tasks' own clocks the 16
    # intervals share a common instant: max(start) < min(end).
    assert all(c["barrier_ok"] for c in train)
    assert max(c["start"] for c in train) < min(c["end"] for c in train), \
        sorted((c["start"], c["end"]) for c in train)
    # Each task has a node of its own and sees that node's 4 fake GPUs.
    assert len({c["node"] for c in train}) == 16
    assert all(c["cvd"] == "0,1,2,3" for c in train), [c["cvd"] for c in train]
    assert len({c["master_port"] for c in train}) == 16 and {c["master_addr"] for c in train} == {"127.0.0.1"}
    # Order: seed + forest < 16 branches (one job) < every expert < the merge.
    order = [c["kind"] for c in sorted(calls, key=lambda c: c["start"])]
    assert order == ["seed", "seed-merge"] + ["branch"] * 16 + ["train"] * 16 + ["merge"]
    assert fakebtm.merged(calls) == [1]
    merge = max(calls, key=lambda c: c["start"])
    assert merge["kind"] == "merge" and merge["start"] >= max(c["end"] for c in train)
    assert _complete(plan)


def _cli(*args):
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *args], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_failed_expert_cancels_merge_status_names_it_resume_reruns_only_it(slurm_cluster, tmp_path):
    fake = tmp_path / "fake"
    raw = mini_plan_dict(tmp_path, fake, domains=(("a", "b", "c", "d"), ("e", "f")))
    raw["executor"] = {"kind": "slurm"}
    plan = plan_from_dict(raw)
    plan_yaml = tmp_path / "plan.yaml"
    plan_yaml.write_text(yaml.safe_dump(raw))
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "fail_domains").write_text("b\n")
    sub = _cli("run", str(plan_yaml))
    assert "submitted: seed, cycle1-branch, cycle1-train:cycle1-train-a" in sub.stdout
    wait_idle(_all_ids(plan), timeout=120)
    jobs = read_json(runner.state_path(plan))["jobs"]
    # The merge never ran: cancelled (kill-on-invalid-dep), as is everything after it.
    assert job_state(jobs["cycle1-merge"][0]["job_id"]) == "CANCELLED"
    assert job_state(jobs["cycle2-branch"][0]["job_id"]) == "CANCELLED"
    calls = fakebtm.read_calls(fake)
    assert fakebtm.merged(calls) == []
    assert sorted(fakebtm.trained(calls)) == ["a", "b", "c", "d"]

    states = {s.node: s for s in runner.node_states(plan, G.build_graph(plan))}
    assert states["cycle1-train-b"].state == "failed" and "fake failure" in states["cycle1-train-b"].error
    assert {n: states[f"cycle1-train-{n}"].state for n in "acd"} == dict.fromkeys("acd", "done")
    assert states["cycle1-merge"].state == "cancelled" and states["cycle2-train-e"].state == "cancelled"
    out = _cli("status", str(plan_yaml))
    assert "failed nodes: cycle1-train-b (node cycle1-train-b: fake failure)" in out.stdout

    (fake / "fail_domains").unlink()
    res = _cli("resume", str(plan_yaml))
    assert ("submitted: cycle1-train:cycle1-train-b, cycle1-merge, cycle2-branch, "
            "cycle2-train:cycle2-train-e, cycle2-train:cycle2-train-f, cycle2-merge") in res.stdout
    wait_idle(_all_ids(plan), timeout=120)
    calls = fakebtm.read_calls(fake)
    assert sorted(fakebtm.trained(calls)) == ["a", "b", "b", "c", "d", "e", "f"]   # only b twice
    assert fakebtm.merged(calls) == [1, 2]
    assert "run complete" in _cli("status", str(plan_yaml)).stdout


def test_requeued_expert_restarts_and_merge_waits(slurm_cluster, tmp_path):
    fake = tmp_path / "fake"
    plan = plan_from_dict(mini_plan_dict(tmp_path, fake, domains=(("a", "b"),), sleep=4))
    _submit(plan)
    jobs = read_json(runner.state_path(plan))["jobs"]
    task_b = f"{jobs['cycle1-train'][0]['job_id']}_1"
    deadline = time.time() + 60
    while not list(fake.glob("started-train-*")) or job_state(task_b) != "RUNNING":
        assert time.time() < deadline, "expert b never started"
        time.sleep(0.2)
    time.sleep(1)
    subprocess.run(["scontrol", "requeue", task_b], check=True)
    wait_idle(_all_ids(plan), timeout=120)
    calls = fakebtm.read_calls(fake)
    b = [c for c in calls if c["kind"] == "train" and c["domain"] == "b"]
    assert [c["restart"] for c in b] == ["1"]                # the killed first run never finished
    merge = [c for c in calls if c["kind"] == "merge"]
    assert len(merge) == 1 and merge[0]["start"] >= b[0]["end"]
    log = next((tmp_path / "run" / "logs").glob("btm-mini-c1-train-*_1.out"))
    assert log.exists()   # --open-mode=append: one log across the requeue
    assert _complete(plan)
