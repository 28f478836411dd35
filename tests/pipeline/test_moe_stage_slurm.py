"""The MoE stages under the real scheduler (the project's local cluster, a fake `btm` that only
records and writes done-records): merge-moe starts after the last cycle's merge, every train-moe
job after merge-moe, eval after every train-moe job; the run completes and a resubmission of the
finished run submits nothing."""
from __future__ import annotations

import pytest
from launch_helpers import fakebtm, mini_plan_dict, wait_idle

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import slurm_executor as runner
from megatron_btm.pipeline.plan import plan_from_dict
from megatron_btm.pipeline.run import status
from megatron_btm.utils.io import read_json

pytestmark = pytest.mark.slurm


def test_moe_jobs_run_in_graph_order_and_complete(slurm_cluster, tmp_path):
    fake = tmp_path / "fake"
    raw = mini_plan_dict(tmp_path, fake, domains=(("a", "b"),))
    raw["moe"] = {"train": [{"mode": "router-only"}, {"mode": "full"}]}
    raw["evaluation"] = {"domains": ["a"]}
    plan = plan_from_dict(raw)
    graph = G.build_graph(plan)
    assert "merge-moe" in runner.submit(plan, graph)
    st = read_json(runner.state_path(plan))
    wait_idle([s["job_id"] for subs in st["jobs"].values() for s in subs], timeout=180)
    calls = {c["node_id"]: c for c in fakebtm.read_calls(fake)}
    assert set(calls) == {n.id for n in graph.nodes}
    assert calls["merge-moe"]["start"] >= calls["cycle1-merge"]["end"]
    for name in ("router-only", "full"):
        train = calls[f"train-moe-{name}"]
        assert train["start"] >= calls["merge-moe"]["end"] and train["ntasks"] == "1"
        assert calls["eval"]["start"] >= train["end"]
    assert status(plan)[0].rstrip().endswith("run complete")
    assert runner.submit(plan, graph) == []   # every node done: nothing to submit
