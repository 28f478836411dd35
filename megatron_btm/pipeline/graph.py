"""The stage graph of a run plan, its folder layout, and the records that say what is done.

    seed ─> seed-merge ─> cycle1-branch-<d> ─> cycle1-train-<d> ─┐ (every d)
                                                               cycle1-merge ─> cycle2-branch-<d> ...
                                                                          ... ─> eval
                                   (a moe section: ... ─> merge-moe ─> train-moe-<name> ─> eval)

Every node has an id, a kind, declared inputs (the nodes it needs) and outputs (folders or
files under run_dir). A node is done when its done-record `graph/done/<id>.json` exists; the
record is written atomically after the outputs, so a node killed mid-way is simply not done.
A node that raised leaves `graph/failed/<id>.json` (what failed and where its log is); the
next successful attempt removes it. Executors only decide *where* nodes run; what "done",
"failed" and "ready" mean is decided here, once.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btm.utils.io import atomic_write_json, read_json

SEED, SEED_MERGE, BRANCH, TRAIN, MERGE, EVAL = "seed", "seed-merge", "branch", "train", "merge", "eval"
MERGE_MOE, TRAIN_MOE = "merge-moe", "train-moe"   # the plan's moe section (pipeline/moe_nodes.py)
KINDS = (SEED, SEED_MERGE, BRANCH, TRAIN, MERGE, EVAL, MERGE_MOE, TRAIN_MOE)
GRAPH_DIR = "graph"
PLAN_FILE = "plan.json"     # the frozen, resolved plan every node of the run reads


@dataclass(frozen=True, kw_only=True)
class Node:
    id: str
    kind: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()   # relative to run_dir
    cycle: int = 0
    domain: str | None = None


@dataclass(kw_only=True)
class Graph:
    run_dir: Path
    nodes: list[Node] = field(default_factory=list)   # a topological order

    def __post_init__(self):
        self.by_id = {n.id: n for n in self.nodes}

    def __getitem__(self, node_id: str) -> Node:
        try:
            return self.by_id[node_id]
        except KeyError:
            raise ValueError(f"node {node_id!r}: not in this plan's graph; nodes: "
                             f"{', '.join(self.by_id)}") from None

    def downstream(self, node_id: str) -> set[str]:
        """Every node that needs `node_id`, directly or not."""
        out: set[str] = set()
        for n in self.nodes:   # topological: inputs come first
            if node_id in n.inputs or out.intersection(n.inputs):
                out.add(n.id)
        return out

    # ---- records ------------------------------------------------------------------------
    def _record(self, state: str, node_id: str) -> Path:
        return self.run_dir / GRAPH_DIR / state / f"{node_id}.json"

    def done(self, node_id: str) -> bool:
        return self._record("done", node_id).is_file()

    def failure(self, node_id: str) -> dict[str, Any] | None:
        path = self._record("failed", node_id)
        return read_json(path) if path.is_file() else None

    def mark_done(self, node: Node, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self._record("done", node.id), {
            "id": node.id, "kind": node.kind, "inputs": list(node.inputs),
            "outputs": list(node.outputs), "finished": _now(), **(info or {})})
        self._record("failed", node.id).unlink(missing_ok=True)

    def mark_failed(self, node: Node, error: str, **info: Any) -> None:
        atomic_write_json(self._record("failed", node.id),
                          {"id": node.id, "kind": node.kind, "error": error, "when": _now(), **info})

    def ready(self, node_id: str) -> bool:
        return all(self.done(i) for i in self[node_id].inputs)

    def pending(self) -> list[Node]:
        return [n for n in self.nodes if not self.done(n.id)]

    def state(self, node_id: str) -> str:
        """done | failed | ready | waiting (for its inputs)."""
        if self.done(node_id):
            return "done"
        if self.failure(node_id) is not None:
            return "failed"
        return "ready" if self.ready(node_id) else "waiting"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- layout: where each node's outputs live, relative to run_dir -------------------------
def seed_run() -> str:
    return "seed"


def forest() -> str:
    return "forest"


def forest_root(plan) -> str:
    """The forest a plan grows: its own (run_dir/forest) or an existing one (`forest:`)."""
    return plan.forest or forest()


def branch_dir(cycle: int, domain: str) -> str:
    return f"cycle{cycle}/branch/{domain}"


def expert_run(cycle: int, domain: str) -> str:
    return f"cycle{cycle}/experts/{domain}"


def eval_file(split: str) -> str:
    return f"eval/{split}.json"


def node_id(kind: str, cycle: int = 0, domain: str | None = None) -> str:
    if kind in (SEED, SEED_MERGE, EVAL):
        return kind
    return f"cycle{cycle}-{kind}" + (f"-{domain}" if domain is not None else "")


def build_graph(plan) -> Graph:
    """The nodes of a plan, in a topological order (the order the in-process executor runs)."""
    nodes: list[Node] = []
    prev: str | None = None   # None: the plan extends an existing forest (no seed stage)
    if plan.forest is None:
        if plan.seed.trained:
            nodes.append(Node(id=SEED, kind=SEED, outputs=(seed_run(),)))
        nodes.append(Node(id=SEED_MERGE, kind=SEED_MERGE, inputs=tuple(n.id for n in nodes),
                          outputs=(forest(),)))
        prev = SEED_MERGE
    for cycle in plan.cycles:
        c = cycle.index
        trains = []
        for d in cycle.domains:
            b = Node(id=node_id(BRANCH, c, d), kind=BRANCH, inputs=(prev,) if prev else (),
                     cycle=c, domain=d,
                     outputs=(branch_dir(c, d),))
            t = Node(id=node_id(TRAIN, c, d), kind=TRAIN, inputs=(b.id,), cycle=c, domain=d,
                     outputs=(expert_run(c, d),))
            nodes += [b, t]
            trains.append(t.id)
        # the merge needs every expert of its cycle: a partial cycle is never merged
        merge = Node(id=node_id(MERGE, c), kind=MERGE, inputs=tuple(trains), cycle=c,
                     outputs=(forest_root(plan),))
        nodes.append(merge)
        prev = merge.id
    moe: list[Node] = []
    if plan.moe is not None:
        from megatron_btm.pipeline.moe_nodes import build_nodes
        moe = build_nodes(plan, after=prev)
        nodes += moe
    if plan.evaluation.domains:   # with MoE rows: after the merged MoE and every trained one
        nodes.append(Node(id=EVAL, kind=EVAL, inputs=(prev, *(n.id for n in moe)),
                          outputs=(eval_file(plan.evaluation.split),)))
    return Graph(run_dir=Path(plan.run_dir), nodes=nodes)
