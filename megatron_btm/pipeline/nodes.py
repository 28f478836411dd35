"""Running one node of the stage graph: the rules, once, for every executor.

`run_node` is the only way a node runs (in-process, in a local subprocess, in a SLURM job):
  - a done node is a no-op;
  - a node whose inputs are not all done refuses to run (so a cycle's merge never runs while
    one of its experts failed, whoever calls it);
  - the cycle index comes from the graph, never from the forest;
  - branch reads the forest as it was before its cycle (experts of earlier cycles only);
  - the done-record is written after the outputs; a failure leaves a failed-record naming it.
The stage bodies are the library's own stage functions (stages/), registered in BODIES.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from megatron_btm.errors import JobFailedError
from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import moe_nodes
from megatron_btm.pipeline.plan import RunPlan, plan_from_dict
from megatron_btm.utils.io import atomic_write_json, read_json

FAIL_ENV = "BTM_TEST_FAIL_NODES"   # test-only: comma-separated node ids that fail on start


class NodeFailed(JobFailedError):
    """A node of the graph failed (its failed-record says why)."""


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


# ---- the frozen plan of a run --------------------------------------------------------------
FREE_KEYS = ("executor", "cluster")   # where a run executes may change between invocations


def plan_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / G.GRAPH_DIR / G.PLAN_FILE


def freeze(plan: RunPlan) -> Path:
    """Record the resolved plan in run_dir (first invocation), or check that this invocation
    describes the same run (later ones): a changed run is refused, naming the keys."""
    path = plan_file(plan.run_dir)
    resolved = plan.to_dict()
    if path.is_file():
        old = read_json(path)
        try:   # keys added since the run froze its plan take their defaults on both sides
            old = plan_from_dict(old, source=str(path)).to_dict()
        except ValueError:
            pass
        changed = sorted(k for k in set(old) | set(resolved)
                         if k not in FREE_KEYS and old.get(k) != resolved.get(k))
        if changed:
            raise ValueError(f"{plan.source or 'plan'}: run_dir {plan.run_dir} holds a run of a "
                             f"different plan (changed keys: {', '.join(changed)}); use a new "
                             f"run_dir, or restore the plan recorded in {path}")
    if not path.is_file() or read_json(path) != resolved:
        atomic_write_json(path, resolved)
    return path


def load_frozen(run_dir: str | Path) -> RunPlan:
    path = plan_file(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run here (start it with `btm run PLAN`)")
    return plan_from_dict(read_json(path), source=str(path))


# ---- stage bodies: (plan, node) -> info for the done-record ---------------------------------
def _path(plan: RunPlan, rel: str) -> Path:
    return Path(plan.run_dir) / rel


def _seed(plan: RunPlan, node: G.Node) -> dict[str, Any]:
    from megatron_btm.stages.train import train_seed
    res = train_seed(plan.train_config_for("seed"), data_dir=plan.data_dir,
                     domains=plan.seed.domains, output_dir=_path(plan, G.seed_run()))
    return {"steps": res.step, "tokens": res.tokens}


def _seed_merge(plan: RunPlan, node: G.Node) -> dict[str, Any]:
    from megatron_btm.forest import Forest
    from megatron_btm.stages.merge import merge_seed
    root = _path(plan, G.forest_root(plan))
    if plan.seed.trained:
        merge_seed(root, _path(plan, G.seed_run()))
        return {}
    if plan.seed.checkpoint is not None:   # ours (a folder or a root) or a Megatron-LM --save
        merge_seed(root, plan.seed.checkpoint)
        return {}
    if Forest.exists(root):   # created by an earlier attempt killed before its done-record
        if Forest.open(root).seed().extra.get("meta", {}).get("source") != "random-init":
            raise ValueError(f"{root}: a forest already exists with another seed")
        return {}
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import save_initial_weights
    parallel.init_distributed()   # a node process of its own (local, SLURM): no group yet
    init = _path(plan, "seed-init")
    shutil.rmtree(init, ignore_errors=True)   # an interrupted save: start over
    ckpt = save_initial_weights(plan.train_config_for(f"cycle{plan.first_cycle}"), init)
    Forest.create(root, seed_checkpoint=ckpt, copy=True,
                  seed_meta={"kind": "random-init", "source": "random-init", "steps": 0, "tokens": 0})
    return {}


def _branch(plan: RunPlan, node: G.Node) -> dict[str, Any]:
    return _branch_many(plan, [node])[node.id]


def _branch_many(plan: RunPlan, nodes_: list[G.Node]) -> dict[str, dict[str, Any]]:
    """Branch nodes of one cycle together: the experts are loaded and scored once for all."""
    from megatron_btm.stages.branch import branch
    cycle = nodes_[0].cycle
    assert all(n.kind == G.BRANCH and n.cycle == cycle for n in nodes_)
    recs = branch(_path(plan, G.forest_root(plan)), domains=[n.domain for n in nodes_],
                  data_dir=plan.data_dir, output_dir=_path(plan, G.branch_dir(cycle, "x")).parent,
                  cfg=plan.branch, cycle=cycle)
    return {n.id: {"parents": recs[n.domain]["parents"]} for n in nodes_}


def _train(plan: RunPlan, node: G.Node) -> dict[str, Any]:
    from megatron_btm.stages.train import train_expert
    res = train_expert(plan.train_config_for(f"cycle{node.cycle}"), data_dir=plan.data_dir,
                       domain=node.domain, output_dir=_path(plan, G.expert_run(node.cycle, node.domain)),
                       init_from=_path(plan, G.branch_dir(node.cycle, node.domain)))
    return {"steps": res.step, "tokens": res.tokens}


def _merge(plan: RunPlan, node: G.Node) -> dict[str, Any]:
    from megatron_btm.stages.merge import merge_expert
    cycle = plan.cycle(node.cycle)
    merged = [merge_expert(_path(plan, G.forest_root(plan)), _path(plan, G.expert_run(node.cycle, d)),
                           domain=d, cycle=node.cycle).id for d in cycle.domains]
    return {"experts": merged}


def _eval(plan: RunPlan, node: G.Node) -> dict[str, Any]:
    from megatron_btm.inference.forest_eval import evaluate_forest, format_table
    ev = plan.evaluation
    clusters = None
    if ev.clusters:
        from megatron_btm.routing.cluster_cli import load_router
        clusters = load_router(ev.clusters, ev.cluster_temperature, "plan key 'evaluation.clusters'")
    moe_models, moe_topk = moe_nodes.eval_models(plan)   # none without a moe section
    table = evaluate_forest(_path(plan, G.forest_root(plan)), plan.data_dir, ev.domains, split=ev.split,
                            topk=ev.topk, modes=ev.modes, max_blocks=ev.max_blocks, clusters=clusters,
                            moe_models=moe_models, moe_topk=moe_topk)
    out = _path(plan, G.eval_file(ev.split))
    if _rank() == 0:
        atomic_write_json(out, table)
        print(format_table(table))
    return {"table": str(out)}


BODIES: dict[str, Callable[[RunPlan, G.Node], dict[str, Any]]] = {
    G.SEED: _seed, G.SEED_MERGE: _seed_merge, G.BRANCH: _branch, G.TRAIN: _train,
    G.MERGE: _merge, G.EVAL: _eval, **moe_nodes.BODIES}


# ---- the one runner -----------------------------------------------------------------------
def run_node(plan: RunPlan, graph: G.Graph, node_id: str, *, log: Callable[[str], None] = print) -> bool:
    """Run one node unless it is done; returns True if it ran. Raises NodeFailed on failure."""
    return bool(run_nodes(plan, graph, [node_id], log=log))


def run_nodes(plan: RunPlan, graph: G.Graph, node_ids: list[str], *,
              log: Callable[[str], None] = print) -> list[str]:
    """Run these nodes in order (done ones are no-ops; branch nodes of one cycle as one batch);
    returns the ids that ran. Raises NodeFailed at the first failure."""
    todo = []
    for node_id in node_ids:
        node = graph[node_id]
        if graph.done(node.id):
            log(f"[{node.id}] done already, skipped")
            continue
        missing = [i for i in node.inputs if not graph.done(i) and i not in node_ids]
        if missing:
            raise ValueError(f"node {node.id}: its inputs {missing} are not done; it runs only "
                             f"after them (`btm status` shows why)")
        todo.append(node)
    ran: list[str] = []
    while todo:
        batch = [todo.pop(0)]
        while batch[0].kind == G.BRANCH and todo and todo[0].kind == G.BRANCH \
                and todo[0].cycle == batch[0].cycle:
            batch.append(todo.pop(0))
        _run_batch(plan, graph, batch, log)
        ran += [n.id for n in batch]
    return ran


def _run_batch(plan: RunPlan, graph: G.Graph, batch: list[G.Node], log) -> None:
    rank0 = _rank() == 0
    try:
        for node in batch:
            if node.id in os.environ.get(FAIL_ENV, "").split(","):
                raise NodeFailed(f"node {node.id}: failed on purpose ({FAIL_ENV})")
            missing = [i for i in node.inputs if not graph.done(i)]
            if missing:
                raise ValueError(f"node {node.id}: its inputs {missing} are not done")
        infos = (_branch_many(plan, batch) if len(batch) > 1
                 else {batch[0].id: BODIES[batch[0].kind](plan, batch[0])})
    except BaseException as e:
        if rank0:
            for node in batch:
                graph.mark_failed(node, str(e) if isinstance(e, NodeFailed) else f"{type(e).__name__}: {e}")
        if isinstance(e, (NodeFailed, KeyboardInterrupt)):
            raise
        raise NodeFailed(f"node {', '.join(n.id for n in batch)} failed: {e}") from e
    if rank0:
        for node in batch:
            graph.mark_done(node, infos[node.id])
            log(f"[{node.id}] done: {', '.join(str(_path(plan, o)) for o in node.outputs)}")
