"""Review of the SLURM executor's status: a resubmitted node that is queued or running does not
carry the error of its earlier, failed attempt."""
from __future__ import annotations

from launch_helpers import mini_plan_dict
from test_runner import FakeScheduler, _done, _states, _submit

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import slurm_executor as runner
from megatron_btm.pipeline.plan import plan_from_dict


def test_requeued_node_shows_no_stale_error(tmp_path, monkeypatch):
    plan = plan_from_dict(mini_plan_dict(tmp_path, domains=(("a", "b"),)))
    s = FakeScheduler(monkeypatch)
    _submit(plan)
    s.set_all("COMPLETED")
    s.states["103_1"] = "FAILED"
    _done(plan, "seed", "seed-merge", "cycle1-branch-a", "cycle1-branch-b", "cycle1-train-a")
    g = G.build_graph(plan)
    g.mark_failed(g["cycle1-train-b"], "RuntimeError: out of memory")
    assert _states(plan)["cycle1-train-b"] == "failed"
    _submit(plan)                       # the failed expert is resubmitted and now pending
    row = {n.node: n for n in runner.node_states(plan, G.build_graph(plan))}["cycle1-train-b"]
    assert row.state == "PENDING" and row.error == ""
    assert "out of memory" not in runner.format_status(plan, list(
        runner.node_states(plan, G.build_graph(plan))))


def test_a_hung_slurm_command_is_a_slurm_error(monkeypatch):
    """A slurmctld that does not answer: one SlurmError naming the command, not a
    subprocess.TimeoutExpired (which the CLI reports as a bug)."""
    import subprocess

    import pytest

    from megatron_btm.pipeline import slurm

    def hang(argv, **kw):
        raise subprocess.TimeoutExpired(argv, kw.get("timeout"))
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(slurm.subprocess, "run", hang)
    with pytest.raises(slurm.SlurmError, match="scontrol show job 7.*did not answer within 60 s"):
        slurm.job_states("7")
