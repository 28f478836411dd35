"""Lineage over the forest's parent graph: pure functions, no I/O.

The graph is a DAG (every parent belongs to an earlier cycle than its child, enforced when an
expert is added). It includes removed experts, so lineage survives removals: an expert whose
parent was removed still traces back to the seed, and removing an ancestor is correctly reported
as "not complete unlearning" for every descendant.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

ParentMap = Mapping[str, Sequence[tuple[str, float]]]


def lineage(parents: ParentMap, node: str) -> list[tuple[str, float, int]]:
    """Ancestors of `node` as (ancestor id, edge weight, depth), depth-first, parents in order.

    The weight is that of the edge into the child printed just above (depth 1 = the weight of a
    direct parent in `node`'s initialisation). An ancestor reachable along several paths appears
    once per path, so the list reads as a tree when indented by depth.
    """
    if node not in parents:
        raise ValueError(f"unknown node {node!r}; known: {sorted(parents)}")
    out: list[tuple[str, float, int]] = []

    def visit(child: str, depth: int) -> None:
        for pid, w in parents.get(child, ()):
            out.append((pid, w, depth))
            visit(pid, depth + 1)

    visit(node, 1)
    return out


def ancestor_weights(parents: ParentMap, node: str) -> dict[str, float]:
    """Each ancestor's total share in `node`'s initialisation: Σ over paths of Π edge weights.

    With normalised parent weights every path ends at the seed, whose share is then 1.
    """
    share: dict[str, float] = {}
    for pid, w in parents[node]:
        share[pid] = share.get(pid, 0.0) + w
        for aid, aw in ancestor_weights(parents, pid).items():
            share[aid] = share.get(aid, 0.0) + w * aw
    return share


def descendants(parents: ParentMap, node: str) -> set[str]:
    """Every node that has `node` as an ancestor (through any path, removed nodes included)."""
    children: dict[str, list[str]] = {}
    for child, ps in parents.items():
        for pid, _ in ps:
            children.setdefault(pid, []).append(child)
    out: set[str] = set()
    stack = list(children.get(node, ()))
    while stack:
        c = stack.pop()
        if c not in out:
            out.add(c)
            stack.extend(children.get(c, ()))
    return out


def format_tree(root_label: str, lines: list[tuple[str, float, int]]) -> str:
    """Render `lineage` output as an indented tree under `root_label`."""
    out = [root_label]
    for aid, w, depth in lines:
        out.append(f"{'    ' * (depth - 1)}└── {aid}  (weight {w:.4g})")
    return "\n".join(out)
