"""SLURM executor submit / status / resume against a scripted scheduler (no SLURM): which jobs
are resubmitted, with which dependencies, and what status reports (done = the done-records); the real-cluster versions are in
test_slurm_cluster.py."""
from __future__ import annotations

import pytest
from launch_helpers import mini_plan_dict

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import slurm
from megatron_btm.pipeline import slurm_executor as runner
from megatron_btm.pipeline.plan import plan_from_dict
from megatron_btm.pipeline.run import status


class FakeScheduler:
    def __init__(self, monkeypatch):
        self.next_id, self.states, self.submitted, self.cancelled = 100, {}, [], []
        monkeypatch.setattr(slurm, "sbatch", self.sbatch)
        monkeypatch.setattr(slurm, "scancel", self.cancelled.extend)
        monkeypatch.setattr(slurm, "job_states", self.job_states)

    def sbatch(self, script, *, after=(), array=None, extra=()):
        self.next_id += 1
        jid = str(self.next_id)
        self.submitted.append((script.rsplit("/", 1)[-1], list(after), array))
        if array:
            for i in slurm._expand(array):
                self.states[f"{jid}_{i}"] = "PENDING"
        else:
            self.states[jid] = "PENDING"
        return jid

    def job_states(self, job_id):
        return {k: slurm.TaskState(job_id=k, state=v.split("/")[0], reason=(v.split("/") + [""])[1])
                for k, v in self.states.items() if k.split("_")[0] == job_id}

    def set_all(self, state):
        for k in self.states:
            self.states[k] = state


@pytest.fixture
def plan(tmp_path):
    return plan_from_dict(mini_plan_dict(tmp_path, domains=(("a", "b", "c"), ("d",))))


def _done(plan, *ids):
    g = G.build_graph(plan)
    for i in ids:
        g.mark_done(g[i])


def _submit(plan):
    return runner.submit(plan, G.build_graph(plan))


def _states(plan):
    return {s.node: s.state for s in runner.node_states(plan, G.build_graph(plan))}


def test_submit_chains_every_stage(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    _submit(plan)
    assert s.submitted == [
        ("00-seed.sbatch", [], None), ("01-cycle1-branch.sbatch", ["101"], None),
        ("01-cycle1-train.sbatch", ["102"], "0-2%16"), ("01-cycle1-merge.sbatch", ["103"], None),
        ("02-cycle2-branch.sbatch", ["104"], None), ("02-cycle2-train.sbatch", ["105"], "0%16"),
        ("02-cycle2-merge.sbatch", ["106"], None)]
    s.submitted.clear()
    assert _submit(plan) == [] and s.submitted == []   # all queued: nothing twice


def test_resume_reruns_failed_expert_keeps_running_one_and_replaces_the_merge(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    _submit(plan)
    s.set_all("CANCELLED/DependencyNeverSatisfied")
    s.states.update({"101": "COMPLETED", "102": "COMPLETED", "103_0": "COMPLETED", "103_1": "FAILED",
                     "103_2": "RUNNING"})
    _done(plan, "seed", "seed-merge", "cycle1-branch-a", "cycle1-branch-b", "cycle1-branch-c",
          "cycle1-train-a")
    st = _states(plan)
    assert st["cycle1-train-b"] == "failed" and st["cycle1-train-c"] == "RUNNING"
    assert st["cycle1-merge"] == "cancelled" and st["cycle1-train-a"] == "done"
    assert "failed nodes: cycle1-train-b (job 103_1 FAILED" in status(plan)[0]
    s.submitted.clear()
    redone = _submit(plan)
    assert redone == ["cycle1-train:cycle1-train-b", "cycle1-merge", "cycle2-branch",
                      "cycle2-train:cycle2-train-d", "cycle2-merge"]
    assert s.submitted == [
        ("01-cycle1-train.sbatch", [], "1%16"),                 # branch done: no dependency
        ("01-cycle1-merge.sbatch", ["103_2", "108"], None),     # the running task + the rerun
        ("02-cycle2-branch.sbatch", ["109"], None), ("02-cycle2-train.sbatch", ["110"], "0%16"),
        ("02-cycle2-merge.sbatch", ["111"], None)]
    assert s.cancelled == []
    # once every node reports done, a second resume has nothing to do
    _done(plan, *[n.id for n in G.build_graph(plan).nodes])
    assert status(plan)[0].rstrip().endswith("run complete") and _submit(plan) == []


def test_failed_branch_reruns_the_whole_cycle(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    _submit(plan)
    s.set_all("CANCELLED/DependencyNeverSatisfied")
    s.states.update({"101": "COMPLETED", "102": "FAILED"})
    _done(plan, "seed", "seed-merge")
    assert _states(plan)["cycle1-branch-a"] == "failed"
    s.submitted.clear()
    assert _submit(plan) == ["cycle1-branch", "cycle1-train:cycle1-train-a", "cycle1-train:cycle1-train-b",
                             "cycle1-train:cycle1-train-c", "cycle1-merge", "cycle2-branch",
                             "cycle2-train:cycle2-train-d", "cycle2-merge"]
    assert s.submitted[0] == ("01-cycle1-branch.sbatch", [], None)
    assert s.submitted[1] == ("01-cycle1-train.sbatch", ["108"], "0-2%16")


def test_purged_jobs_use_the_done_records(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    _submit(plan)
    s.states.clear()     # slurmctld forgot everything (MinJobAge)
    _done(plan, "seed", "seed-merge")
    st = _states(plan)
    assert st["seed"] == "done" and st["cycle1-branch-a"] == "lost"
    s.submitted.clear()
    assert _submit(plan)[0] == "cycle1-branch" and s.submitted[0][1] == []


def test_status_of_a_run_that_never_started(plan):
    text, rows = status(plan)
    assert rows[0] == {"node": "seed", "state": "ready", "error": ""} and "run incomplete" in text
