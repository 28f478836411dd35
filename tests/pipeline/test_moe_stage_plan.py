"""The plan's `moe:` section (no training): its one-line errors naming the key, the graph with and
without it (without: the same nodes and the same frozen plan as before the section existed),
the rules on the new nodes (stage bodies replaced by recorders), the composed training config,
the eval node's MoE models and the SLURM jobs."""
from __future__ import annotations

import re

import pytest
import yaml
from launch_helpers import mini_plan_dict

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import moe_nodes, nodes
from megatron_btm.pipeline.executors import run_inprocess
from megatron_btm.pipeline.nodes import NodeFailed, freeze
from megatron_btm.pipeline.plan import check_training, load_plan, plan_from_dict
from megatron_btm.pipeline.run import status

MOE = {"topk": 2, "train": [{"mode": "router-only", "steps": 3},
                            {"mode": "full", "name": "full", "steps": 2, "lr": 0.01,
                             "domains": ["a", "c"], "weights": {"a": 2}}]}


def _raw(tmp_path, moe=None, **kw):
    raw = mini_plan_dict(tmp_path)   # seed + cycle 1 (a, b) + cycle 2 (c, d)
    if moe is not None:
        raw["moe"] = moe
    raw.update(kw)
    return raw


@pytest.mark.parametrize("moe, key, rule", [
    ({"topk": 2, "routr": "hidden"}, "moe", r"unknown key\(s\) \['routr'\]"),
    ({"train": [{"mode": "full", "stpes": 3}]}, "moe.train[0]", r"unknown key\(s\) \['stpes'\]"),
    ({"train": [{"steps": 3}]}, "moe.train[0]", r"missing required key\(s\) \['mode'\]"),
    ({"train": [{"mode": "frozen"}]}, "moe.train[0].mode", "valid modes: router-only, full"),
    ({"topk": 5}, "moe.topk", "larger than the 4 experts merged"),
    ({"experts": ["a", "b"], "topk": 3}, "moe.topk", "larger than the 2 experts merged"),
    ({"experts": ["a", "zz"]}, "moe.experts[1]", "not an expert of this plan's forest"),
    ({"experts": ["a", "a"]}, "moe.experts", "named twice"),
    ({"router": "learned"}, "moe.router", "valid routers: hidden, random"),
    ({"shared": "average"}, "moe.shared", "'uniform' or 'posterior:PRIOR.json'"),
    ({"eval_topk": [1, 9]}, "moe.eval_topk[1]", "larger than the 4 experts merged"),
    ({"train": [{"mode": "full"}, {"mode": "full"}]}, "moe.train[1].name", "already in moe.train"),
    ({"train": [{"mode": "full", "name": "merged"}]}, "moe.train[0].name", "not be 'merged'"),
    ({"train": [{"mode": "full", "lr": -1}]}, "moe.train[0].lr", "must be a number > 0"),
    ({"train": [{"mode": "full", "steps": 0}]}, "moe.train[0].steps", "positive integer"),
    ({"train": [{"mode": "full", "domains": ["a"], "weights": {"b": 1}}]}, "moe.train[0].weights.b",
     "not one of the run's domains"),
    ({"train": [{"mode": "full", "weights": {"a": 0}}]}, "moe.train[0].weights.a", "> 0"),
    ({"train": [{"mode": "full", "domains": ["../x"]}]}, "moe.train[0].domains[0]", ""),
    ({"train": {"mode": "full"}}, "moe.train", "must be a list"),
])
def test_bad_moe_section_is_one_line_naming_the_key(tmp_path, moe, key, rule):
    f = tmp_path / "plan.yaml"
    f.write_text(yaml.safe_dump(_raw(tmp_path, moe)))
    with pytest.raises(ValueError) as e:
        load_plan(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(f)) and f"plan key {key!r}" in msg, msg
    assert re.search(rule, msg), msg


def test_extending_a_forest_checks_topk_against_the_named_experts_only(tmp_path):
    raw = _raw(tmp_path, {"topk": 8})
    del raw["seed"]
    raw.update(forest=str(tmp_path / "forest"), first_cycle=3)
    assert plan_from_dict(raw).moe.topk == 8   # the forest's experts are known at run time only
    raw["moe"] = {"topk": 3, "experts": ["old1", "c"]}
    with pytest.raises(ValueError, match="'moe.topk' = 3: larger than the 2 experts"):
        plan_from_dict(raw)


def test_no_section_same_graph_and_frozen_plan(tmp_path):
    base = plan_from_dict(_raw(tmp_path / "x", evaluation={"domains": ["a"]}))
    with_moe = plan_from_dict(_raw(tmp_path / "x", MOE, evaluation={"domains": ["a"]}))
    assert base.moe is None and "moe" not in base.to_dict()   # plan.json as before the section
    g0, g1 = G.build_graph(base), G.build_graph(with_moe)
    assert not any(n.kind in (G.MERGE_MOE, G.TRAIN_MOE) for n in g0.nodes)
    assert g0.nodes[:-1] == g1.nodes[:len(g0.nodes) - 1]   # every forest node unchanged
    assert g0["eval"].inputs == ("cycle2-merge",)
    ids = [n.id for n in g1.nodes]
    assert ids[len(g0.nodes) - 1:] == ["merge-moe", "train-moe-router-only", "train-moe-full", "eval"]
    assert g1["merge-moe"].inputs == ("cycle2-merge",) and g1["merge-moe"].outputs == ("moe/merged",)
    assert g1["train-moe-full"].inputs == ("merge-moe",) and g1["train-moe-full"].outputs == ("moe/full",)
    assert g1["eval"].inputs == ("cycle2-merge", "merge-moe", "train-moe-router-only", "train-moe-full")
    assert g1.downstream("merge-moe") == {"train-moe-router-only", "train-moe-full", "eval"}
    # the section survives the frozen plan: a run reloads it the same
    again = plan_from_dict(with_moe.to_dict())
    assert again.to_dict() == with_moe.to_dict() and again.moe.run("full").weights == {"a": 2.0}


def test_a_changed_moe_section_is_a_different_run(tmp_path):
    freeze(plan_from_dict(_raw(tmp_path, MOE)))
    with pytest.raises(ValueError, match="changed keys: moe"):
        freeze(plan_from_dict(_raw(tmp_path, {**MOE, "topk": 1})))
    with pytest.raises(ValueError, match="changed keys: moe"):
        freeze(plan_from_dict(_raw(tmp_path)))


def test_failed_train_moe_blocks_eval_only_and_resume_reruns_it(tmp_path, monkeypatch):
    calls: list[str] = []

    def body(plan, node):
        calls.append(node.id)
        return {}
    monkeypatch.setattr(nodes, "BODIES", {k: body for k in G.KINDS})
    plan = plan_from_dict(_raw(tmp_path, MOE, evaluation={"domains": ["a"]}))
    g = G.build_graph(plan)
    freeze(plan)
    monkeypatch.setenv(nodes.FAIL_ENV, "train-moe-full")
    with pytest.raises(NodeFailed, match="train-moe-full failed.*eval"):
        run_inprocess(plan, g, log=lambda s: None)
    assert calls.index("merge-moe") > calls.index("cycle2-merge")
    assert "train-moe-router-only" in calls and "eval" not in calls   # its sibling still ran
    assert g.state("train-moe-full") == "failed" and g.state("eval") == "waiting"
    monkeypatch.delenv(nodes.FAIL_ENV)
    n = len(calls)
    run_inprocess(plan, g, log=lambda s: None)
    assert calls[n:] == ["train-moe-full", "eval"]
    assert status(plan)[0].rstrip().endswith("run complete")


def test_train_config_is_the_plans_over_the_checkpoints_model(tmp_path):
    raw = _raw(tmp_path, MOE, overrides={"optim.lr": 0.5, "seed": 7})
    raw["moe"]["train"][1]["overrides"] = {"seed": 9, "steps": 100}
    plan = plan_from_dict(raw)
    parent = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64,
              "num_moe_experts": 4, "moe_router_topk": 2}
    full = moe_nodes.train_config(plan, plan.moe.run("full"), parent)
    assert (full.model.num_moe_experts, full.model.ffn_hidden_size) == (4, 64)   # the checkpoint's
    assert (full.steps, full.optim.lr, full.seed) == (2, 0.01, 9)   # run steps/lr > run > plan
    ro = moe_nodes.train_config(plan, plan.moe.run("router-only"), parent)
    assert (ro.steps, ro.optim.lr, ro.seed) == (3, 0.5, 7)


def test_check_training_composes_each_run_and_finds_the_prior(tmp_path):
    raw = _raw(tmp_path, {"train": [{"mode": "full", "overrides": {"optim.nope": 1}}]})
    with pytest.raises(ValueError, match=r"moe.train\[0\].*optim.nope"):
        check_training(plan_from_dict(raw))
    raw = _raw(tmp_path, {"shared": "posterior:prior.json"})
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    plan = load_plan(f)
    assert plan.moe.shared == f"posterior:{tmp_path / 'prior.json'}"   # relative to the plan file
    with pytest.raises(FileNotFoundError, match="'moe.shared'.*prior not found"):
        check_training(plan)


def test_eval_models_are_the_merged_and_every_trained_run(tmp_path):
    plan = plan_from_dict(_raw(tmp_path, {**MOE, "eval_topk": [1]}))
    models, topk = moe_nodes.eval_models(plan)
    run = tmp_path / "run"
    assert models == {"merged": run / "moe/merged", "router-only": run / "moe/router-only",
                      "full": run / "moe/full"} and topk == [1]
    assert moe_nodes.eval_models(plan_from_dict(_raw(tmp_path))) == ({}, [1, 2])


def test_slurm_jobs_chain_merge_moe_train_moe_then_eval(tmp_path):
    from megatron_btm.pipeline import sbatch
    plan = plan_from_dict(_raw(tmp_path, MOE, evaluation={"domains": ["a"]}))
    jobs = {j.key: j for j in sbatch.build_jobs(plan)}
    assert jobs["merge-moe"].after == ["cycle2-merge"] and jobs["merge-moe"].nodes == ["merge-moe"]
    for name in ("router-only", "full"):
        j = jobs[f"train-moe-{name}"]
        assert j.after == ["merge-moe"] and j.nodes == [f"train-moe-{name}"] and j.array is None
        assert f"node \"${{RUN_DIR}}\" train-moe-{name}" in j.text and "srun --ntasks=1" in j.text
    assert jobs["eval"].after == ["train-moe-router-only", "train-moe-full"]
    # every node of the graph is in exactly one job
    in_jobs = [n for j in jobs.values() for n in j.nodes]
    assert sorted(in_jobs) == sorted(n.id for n in G.build_graph(plan).nodes)
    no_train = plan_from_dict(_raw(tmp_path, {"topk": 1}, evaluation={"domains": ["a"]}))
    assert {j.key: j for j in sbatch.build_jobs(no_train)}["eval"].after == ["merge-moe"]


def test_train_moe_runs_on_the_ranks_of_a_training_node(tmp_path):
    """Local: torchrun with executor.ntasks ranks, like the seed and the experts (merge-moe: one
    rank); SLURM: the job asks for ntasks_per_expert tasks, like an expert's."""
    import sys

    from megatron_btm.pipeline import sbatch
    from megatron_btm.pipeline.executors import node_command
    raw = _raw(tmp_path, {**MOE, "train": [{**MOE["train"][0], "overrides": {"parallel.tp": 2}}]},
               executor={"kind": "local", "ntasks": 2})
    raw["cluster"]["ntasks_per_expert"] = 2
    plan = plan_from_dict(raw)
    graph = G.build_graph(plan)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "megatron_btm.cli", "node", plan.run_dir]
    for node in ("train-moe-router-only", "cycle1-train-a", "seed"):
        assert node_command(plan, [graph[node]]) == torchrun + [node]
    assert node_command(plan, [graph["merge-moe"]]) == [sys.executable, "-m", "megatron_btm.cli",
                                                        "node", plan.run_dir, "merge-moe"]
    assert moe_nodes.train_config(plan, plan.moe.train[0], {}).parallel.tp == 2
    jobs = {j.key: j for j in sbatch.build_jobs(plan)}
    for key in ("train-moe-router-only", "cycle1-train"):
        assert "#SBATCH --ntasks-per-node=2" in jobs[key].text and "srun --ntasks=2" in jobs[key].text
