"""`btm launch local`: the plan's stages as subprocesses, in order, parallel experts, resumable."""
from __future__ import annotations

import pytest
from launch_helpers import fakebtm, mini_plan_dict

from megatron_btm.launch import commands as C
from megatron_btm.launch.local import run_local
from megatron_btm.launch.plan import plan_from_dict


def _plan(tmp_path, fake, **kw):
    raw = mini_plan_dict(tmp_path, domains=(("a", "b", "c"), ("d", "e")), **kw)
    raw["cluster"]["btm_command"] = str(fakebtm.install(fake / "bin"))
    return plan_from_dict(raw)


def test_local_runs_every_stage_in_order_with_parallel_experts(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    monkeypatch.setenv("FAKE_BTM_DIR", str(fake))
    monkeypatch.setenv("FAKE_BTM_BARRIER", "3")   # cycle 1's 3 experts must run at once
    plan = _plan(tmp_path, fake)
    assert run_local(plan, parallel=3) == 0
    calls = sorted(fakebtm.read_calls(fake), key=lambda c: c["start"])
    # Independent expectation from the contract's argv, in pipeline order.
    want = [C.render_argv(C.train_seed(plan), C.plan_values(plan)),
            C.render_argv(C.merge_seed(), C.plan_values(plan))]
    for cycle in plan.cycles:
        v = {**C.plan_values(plan), "DOMAIN": ""}
        want.append(C.render_argv(C.branch(plan, cycle), v))
        want += sorted(C.render_argv(C.train_expert(plan, cycle, d), v) for d in cycle.domains)
        want.append(C.render_argv(C.merge_cycle(cycle), v))
    got = [c["argv"] for c in calls]
    # experts within a cycle run in parallel: compare them as a set
    assert len(got) == len(want) == 11
    assert got[:3] == want[:3] and sorted(got[3:6]) == want[3:6] and got[6:8] == want[6:8]
    assert sorted(got[8:10]) == want[8:10] and got[10] == want[10]
    assert fakebtm.merged(calls) == [("a", "1"), ("b", "1"), ("c", "1"), ("d", "2"), ("e", "2")]
    first = sorted(got[3:6])[0]   # expert "a" of cycle 1
    assert first[first.index("--init-from") + 1] == f"{plan.run_dir}/cycle1/branch/a"
    assert first[-2:] == ["--set", "steps=3"]
    c1 = [c for c in calls if c["argv"][0] == "train-expert"][:3]
    assert all(c["barrier_ok"] for c in c1)                          # 3 at once
    assert max(c["start"] for c in c1) < min(c["end"] for c in c1)
    # A second run finds every done-marker and runs nothing.
    assert run_local(plan, parallel=3) == 0
    assert len(fakebtm.read_calls(fake)) == len(calls)


def test_local_failed_expert_stops_before_merge_and_resumes(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    monkeypatch.setenv("FAKE_BTM_DIR", str(fake))
    plan = _plan(tmp_path, fake)
    fake.mkdir(exist_ok=True)
    (fake / "fail_domains").write_text("b\n")
    with pytest.raises(RuntimeError, match=r"cycle 1: 1 expert\(s\) failed: stage cycle1-expert-b failed"):
        run_local(plan, parallel=2)
    assert fakebtm.merged(fakebtm.read_calls(fake)) == []
    (fake / "fail_domains").unlink()
    assert run_local(plan, parallel=2) == 0
    trained = [c["argv"][c["argv"].index("--domain") + 1] for c in fakebtm.read_calls(fake)
               if c["argv"][0] == "train-expert"]
    assert sorted(trained) == ["a", "b", "b", "c", "d", "e"]


def test_multi_rank_stages_go_through_torchrun(tmp_path, capsys):
    raw = mini_plan_dict(tmp_path)
    raw["cluster"].update(ntasks_per_expert=2, seed_ntasks_per_node=4)
    assert run_local(plan_from_dict(raw), dry_run=True) == 0
    lines = capsys.readouterr().out.splitlines()
    seed = next(x for x in lines if "train-seed" in x)
    expert = next(x for x in lines if "train-expert" in x)
    assert "-m torch.distributed.run --standalone --nproc-per-node=4 -m megatron_btm.cli train-seed" in seed
    assert "--nproc-per-node=2 -m megatron_btm.cli train-expert" in expert
    assert all("torch.distributed.run" not in x for x in lines if " merge " in x or " branch " in x)
    assert not (tmp_path / "run").exists()   # a dry run writes nothing
