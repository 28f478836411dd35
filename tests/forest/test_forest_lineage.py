"""The pure lineage functions, against graphs small enough to check by hand."""
from __future__ import annotations

import pytest

from megatron_btm.forest.lineage import ancestor_weights, descendants, format_tree, lineage

# seed -> a, b (cycle 1); c = 0.7 a + 0.3 b (cycle 2); d = 0.5 c + 0.5 a (cycle 3)
GRAPH = {"seed": (), "a": (("seed", 1.0),), "b": (("seed", 1.0),),
         "c": (("a", 0.7), ("b", 0.3)), "d": (("c", 0.5), ("a", 0.5))}


def test_lineage_is_depth_first_tree():
    assert lineage(GRAPH, "d") == [("c", 0.5, 1), ("a", 0.7, 2), ("seed", 1.0, 3),
                                   ("b", 0.3, 2), ("seed", 1.0, 3), ("a", 0.5, 1), ("seed", 1.0, 2)]
    with pytest.raises(ValueError, match="unknown node 'z'"):
        lineage(GRAPH, "z")


def test_ancestor_weights_sum_over_paths():
    w = ancestor_weights(GRAPH, "d")
    # a reaches d directly (0.5) and through c (0.5 * 0.7)
    assert w["a"] == pytest.approx(0.5 + 0.5 * 0.7)
    assert w["b"] == pytest.approx(0.5 * 0.3) and w["c"] == 0.5
    assert w["seed"] == pytest.approx(1.0)  # normalised weights: everything comes from the seed


def test_descendants():
    assert descendants(GRAPH, "a") == {"c", "d"}
    assert descendants(GRAPH, "seed") == {"a", "b", "c", "d"}
    assert descendants(GRAPH, "d") == set()


def test_format_tree():
    text = format_tree("c", lineage(GRAPH, "c"))
    assert text.splitlines() == ["c", "└── a  (weight 0.7)", "    └── seed  (weight 1)",
                                 "└── b  (weight 0.3)", "    └── seed  (weight 1)"]
