"""The stage graph and its rules, with the stage bodies replaced by recorders (no training):
graph shape, done/failed records, refusal of nodes whose inputs are not done, resume that
reruns only what is not done, the frozen plan, status."""
from __future__ import annotations

import pytest
from launch_helpers import mini_plan_dict

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import nodes
from megatron_btm.pipeline.executors import run_inprocess
from megatron_btm.pipeline.nodes import NodeFailed, freeze, run_node
from megatron_btm.pipeline.plan import plan_from_dict
from megatron_btm.pipeline.run import status


@pytest.fixture
def fake_bodies(monkeypatch):
    calls: list[str] = []

    def body(plan, node):
        calls.append(node.id)
        for out in node.outputs:
            (plan_dir(plan) / out).mkdir(parents=True, exist_ok=True)
        return {}
    monkeypatch.setattr(nodes, "BODIES", {k: body for k in G.KINDS})
    return calls


def plan_dir(plan):
    from pathlib import Path
    return Path(plan.run_dir)


def _plan(tmp_path, **kw):
    raw = mini_plan_dict(tmp_path, domains=(("a", "b", "c"), ("d", "e", "f")))
    raw.update(kw)
    return plan_from_dict(raw)


def test_graph_shape_and_order(tmp_path):
    plan = _plan(tmp_path, evaluation={"domains": ["a"]})
    g = G.build_graph(plan)
    ids = [n.id for n in g.nodes]
    assert ids[:2] == ["seed", "seed-merge"] and ids[-1] == "eval"
    assert g["cycle1-merge"].inputs == ("cycle1-train-a", "cycle1-train-b", "cycle1-train-c")
    assert g["cycle2-branch-d"].inputs == ("cycle1-merge",)
    assert g["cycle1-train-b"].inputs == ("cycle1-branch-b",) and g["cycle1-train-b"].cycle == 1
    for n in g.nodes:   # topological
        assert all(ids.index(i) < ids.index(n.id) for i in n.inputs)
    assert g.downstream("cycle1-train-b") == {"cycle1-merge", "eval", *(
        f"cycle2-{k}-{d}" for k in ("branch", "train") for d in "def"), "cycle2-merge"}
    with pytest.raises(ValueError, match="not in this plan's graph"):
        g["cycle3-merge"]


def test_seed_checkpoint_and_random_init_graphs(tmp_path):
    raw = mini_plan_dict(tmp_path)
    raw["seed"] = {"checkpoint": str(tmp_path)}
    assert [n.id for n in G.build_graph(plan_from_dict(raw)).nodes][:2] == ["seed-merge", "cycle1-branch-a"]
    raw["seed"] = {"steps": 0}
    assert G.build_graph(plan_from_dict(raw)).nodes[0].id == "seed-merge"


def test_failed_expert_blocks_its_merge_and_the_next_cycle_resume_reruns_only_it(
        tmp_path, fake_bodies, monkeypatch):
    plan = _plan(tmp_path)
    g = G.build_graph(plan)
    freeze(plan)
    monkeypatch.setenv(nodes.FAIL_ENV, "cycle1-train-b")
    with pytest.raises(NodeFailed, match="cycle1-train-b failed.*cycle1-merge"):
        run_inprocess(plan, g, log=lambda s: None)
    assert "cycle1-merge" not in fake_bodies and not any(c.startswith("cycle2") for c in fake_bodies)
    assert {"cycle1-train-a", "cycle1-train-c"} <= set(fake_bodies)   # siblings still trained
    assert g.state("cycle1-train-b") == "failed" and g.state("cycle1-merge") == "waiting"
    text, rows = status(plan)
    assert "failed nodes: cycle1-train-b (node cycle1-train-b: failed on purpose" in text
    # the merge refuses to run by hand too
    with pytest.raises(ValueError, match=r"inputs \['cycle1-train-b'\] are not done"):
        run_node(plan, g, "cycle1-merge", log=lambda s: None)
    monkeypatch.delenv(nodes.FAIL_ENV)
    before = list(fake_bodies)
    run_inprocess(plan, g, log=lambda s: None)
    rerun = fake_bodies[len(before):]
    assert rerun[0] == "cycle1-train-b" and "cycle1-train-a" not in rerun and "seed" not in rerun
    assert all(g.done(n.id) for n in g.nodes) and g.failure("cycle1-train-b") is None
    assert status(plan)[0].rstrip().endswith("run complete")
    n = len(fake_bodies)
    run_inprocess(plan, g, log=lambda s: None)   # everything done: a no-op
    assert len(fake_bodies) == n


def test_a_changed_plan_on_the_same_run_dir_is_refused(tmp_path):
    freeze(_plan(tmp_path))
    freeze(_plan(tmp_path, executor={"kind": "inprocess"}))   # where it runs may change
    raw = mini_plan_dict(tmp_path, domains=(("a", "b", "c"), ("d", "e", "f")))
    raw["cycles"][1]["steps"] = 99
    with pytest.raises(ValueError, match="changed keys: cycles"):
        freeze(plan_from_dict(raw))


def test_done_record_is_written_after_the_outputs(tmp_path, monkeypatch):
    plan = _plan(tmp_path)
    g = G.build_graph(plan)
    seen = {}

    def body(plan_, node):
        seen["done_during_body"] = g.done(node.id)
        raise KeyboardInterrupt
    monkeypatch.setattr(nodes, "BODIES", {k: body for k in G.KINDS})
    with pytest.raises(KeyboardInterrupt):
        run_node(plan, g, "seed", log=lambda s: None)
    assert seen == {"done_during_body": False} and not g.done("seed")
    assert "KeyboardInterrupt" in g.failure("seed")["error"]


def test_branch_nodes_of_a_cycle_run_as_one_batch(tmp_path, fake_bodies, monkeypatch):
    plan = _plan(tmp_path)
    g = G.build_graph(plan)
    batches = []

    def many(plan_, batch):
        batches.append([n.id for n in batch])
        return {n.id: {} for n in batch}
    monkeypatch.setattr(nodes, "_branch_many", many)
    ids = ["seed", "seed-merge", "cycle1-branch-a", "cycle1-branch-b", "cycle1-branch-c"]
    assert nodes.run_nodes(plan, g, ids, log=lambda s: None) == ids
    assert batches == [["cycle1-branch-a", "cycle1-branch-b", "cycle1-branch-c"]]
    assert all(g.done(i) for i in ids) and fake_bodies == ["seed", "seed-merge"]
    with pytest.raises(ValueError, match=r"inputs \['cycle1-train-a'"):
        nodes.run_nodes(plan, g, ["cycle1-merge"], log=lambda s: None)


def test_the_frozen_plan_loads_back_the_same(tmp_path):
    from megatron_btm.pipeline.nodes import load_frozen
    for extend in (False, True):
        raw = mini_plan_dict(tmp_path / str(extend))
        if extend:   # a plan extending an existing forest has no seed section
            del raw["seed"]
            raw.update(forest=str(tmp_path / "forest"), first_cycle=3)
        plan = plan_from_dict(raw)
        freeze(plan)
        back = load_frozen(plan.run_dir)
        assert back.to_dict() == plan.to_dict() and [c.index for c in back.cycles] == [
            c.index for c in plan.cycles]
