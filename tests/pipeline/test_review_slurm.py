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


def _hung_sbatch(monkeypatch, squeue_lines):
    """sbatch that times out after queueing the job (squeue_lines(tag) lists what squeue sees)."""
    import subprocess

    from megatron_btm.pipeline import slurm

    calls = []

    def run(argv, **kw):
        calls.append(argv)
        if argv[0] == "sbatch":
            raise subprocess.TimeoutExpired(argv, kw.get("timeout"))
        tag = next(a for a in calls[0] if a.startswith("--comment=")).split("=", 1)[1]
        return subprocess.CompletedProcess(argv, 0, stdout="".join(squeue_lines(tag)), stderr="")
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(slurm.subprocess, "run", run)
    return calls


def test_sbatch_that_times_out_after_queueing_returns_the_queued_job(monkeypatch):
    from megatron_btm.pipeline import slurm

    calls = _hung_sbatch(monkeypatch, lambda tag: ["40|other\n", f"41|{tag}\n", "42|btm-submit:x\n"])
    assert slurm.sbatch("job.sh", array="0-3%2") == "41"
    assert [c[0] for c in calls] == ["sbatch", "squeue"]


def test_sbatch_that_times_out_before_queueing_says_nothing_was_queued(monkeypatch):
    import pytest

    from megatron_btm.pipeline import slurm

    _hung_sbatch(monkeypatch, lambda tag: ["40|other\n"])
    with pytest.raises(slurm.SlurmError, match="did not answer.*nothing was queued: submit again"):
        slurm.sbatch("job.sh")
