"""submit / status / resume against a scripted scheduler (no SLURM): which jobs are resubmitted,
with which dependencies, and what status reports; the real-cluster versions are in
test_slurm_cluster.py."""
from __future__ import annotations

import pytest
from launch_helpers import mini_plan_dict

from megatron_btm.launch import runner, slurm
from megatron_btm.launch.plan import plan_from_dict


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


def test_submit_chains_every_stage(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    runner.submit(plan)
    assert s.submitted == [
        ("00-seed.sbatch", [], None), ("01-cycle1-branch.sbatch", ["101"], None),
        ("01-cycle1-train.sbatch", ["102"], "0-2%16"), ("01-cycle1-merge.sbatch", ["103"], None),
        ("02-cycle2-branch.sbatch", ["104"], None), ("02-cycle2-train.sbatch", ["105"], "0%16"),
        ("02-cycle2-merge.sbatch", ["106"], None)]
    with pytest.raises(ValueError, match="already has jobs in the queue"):
        runner.submit(plan)


def test_resume_reruns_failed_expert_keeps_running_one_and_replaces_the_merge(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    runner.submit(plan)
    s.set_all("COMPLETED")
    s.states.update({"103_0": "COMPLETED", "103_1": "FAILED", "103_2": "RUNNING",
                     "104": "CANCELLED/DependencyNeverSatisfied", "105": "CANCELLED/DependencyNeverSatisfied",
                     "106_0": "CANCELLED/DependencyNeverSatisfied", "107": "CANCELLED/DependencyNeverSatisfied"})
    st = runner.status(plan)
    assert [(u.stage, u.domain) for u in st.failed_experts()] == [("cycle1-train", "b")]
    assert "failed experts: cycle1 'b' (job 103_1, FAILED)" in st.format()
    s.submitted.clear()
    redone = runner.resume(plan)
    assert redone == ["cycle1-train:b", "cycle1-merge", "cycle2-branch", "cycle2-train:d", "cycle2-merge"]
    assert s.submitted == [
        ("01-cycle1-train.sbatch", [], "1%16"),                 # branch done: no dependency
        ("01-cycle1-merge.sbatch", ["103_2", "108"], None),     # the running task + the rerun
        ("02-cycle2-branch.sbatch", ["109"], None), ("02-cycle2-train.sbatch", ["110"], "0%16"),
        ("02-cycle2-merge.sbatch", ["111"], None)]
    assert s.cancelled == []
    # The state file now points at the new submissions; a second resume has nothing to do
    # once they succeed.
    s.set_all("COMPLETED")
    assert runner.status(plan).complete() and runner.resume(plan) == []


def test_failed_branch_reruns_the_whole_cycle(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    runner.submit(plan)
    s.set_all("CANCELLED/DependencyNeverSatisfied")
    s.states.update({"101": "COMPLETED", "102": "FAILED"})
    st = runner.status(plan)
    assert st.failed_experts() == [] and "failed jobs: cycle1-branch (job 102, FAILED)" in st.format()
    s.submitted.clear()
    assert runner.resume(plan) == ["cycle1-branch", "cycle1-train:a", "cycle1-train:b", "cycle1-train:c",
                                   "cycle1-merge", "cycle2-branch", "cycle2-train:d", "cycle2-merge"]
    assert s.submitted[0] == ("01-cycle1-branch.sbatch", [], None)
    assert s.submitted[1] == ("01-cycle1-train.sbatch", ["108"], "0-2%16")


def test_purged_jobs_fall_back_to_done_markers(plan, monkeypatch):
    s = FakeScheduler(monkeypatch)
    runner.submit(plan)
    s.states.clear()     # slurmctld forgot everything (MinJobAge)
    done = runner._marker(plan, "seed")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
    units = {(u.stage, u.domain): u.state for u in runner.status(plan).units}
    assert units[("seed", None)] == "DONE" and units[("cycle1-branch", None)] == "UNKNOWN"
    s.submitted.clear()
    assert runner.resume(plan)[0] == "cycle1-branch" and s.submitted[0][1] == []


def test_status_of_an_unsubmitted_plan_says_so(plan):
    with pytest.raises(FileNotFoundError, match="no launch state; plan 'mini' was not submitted"):
        runner.status(plan)
