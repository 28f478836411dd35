"""Ids and domains: nothing that escapes a path or reaches a shell gets through any entry point."""
from __future__ import annotations

import pytest
from forest_testutil import make_checkpoint

from megatron_btm.forest import Forest, check_domain, check_expert_id, check_name

BAD = ["a/b", "/abs", "../up", "..", "a..b", "$(rm -rf x)", "a;b", "a b", "", ".hidden", "-flag",
       "a|b", "`x`", "a\nb", "x" * 129, "é", "a\\b", "a*"]
GOOD = ["legal", "c4_en-v2.1", "A" * 128, "0", "x.y"]


@pytest.mark.parametrize("name", BAD)
def test_bad_names_rejected_naming_value_and_rule(name):
    with pytest.raises(ValueError) as e:
        check_name(name, "expert id")
    assert repr(name) in str(e.value) and "[A-Za-z0-9._-]" in str(e.value)


@pytest.mark.parametrize("name", GOOD)
def test_good_names_accepted(name):
    assert check_name(name) == name == check_expert_id(name) == check_domain(name)


def test_non_string_and_reserved():
    with pytest.raises(ValueError, match="must be a string"):
        check_name(3)
    with pytest.raises(ValueError, match="reserved for the seed"):
        check_expert_id("seed")
    with pytest.raises(ValueError, match="reserved for the seed"):
        check_domain("seed")


@pytest.mark.parametrize("name", ["../escape", "$(touch pwned)", "a;b", "a b", "x/y"])
def test_every_entry_point_validates(tmp_path, name):
    forest = Forest.create(tmp_path / "f", seed_checkpoint=make_checkpoint(tmp_path / "s", 0),
                           seed_meta={})
    ckpt = make_checkpoint(tmp_path / "c", 1)
    kw = dict(checkpoint_dir=ckpt, cycle=1, steps=0, tokens=0, config={})
    with pytest.raises(ValueError, match="expert id"):
        forest.add_expert(name, domain="ok", parents=[("seed", 1.0)], **kw)
    with pytest.raises(ValueError, match="domain"):
        forest.add_expert("ok", domain=name, parents=[("seed", 1.0)], **kw)
    with pytest.raises(ValueError, match="parent id"):
        forest.add_expert("ok", domain="ok", parents=[(name, 1.0)], **kw)
    for call in (forest.get, forest.remove, forest.lineage, forest.descendants, forest.by_domain,
                 forest.checkpoint_path):
        with pytest.raises(ValueError, match="not allowed"):
            call(name)
    with pytest.raises(ValueError, match="domains_mix domain"):
        Forest.create(tmp_path / "g", seed_checkpoint=ckpt, seed_meta={}, domains_mix={name: 1.0})
    # nothing was created outside the forest, and nothing inside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "f", "s"]  # no "g"
    assert forest.experts() == [] and list((forest.root / "experts").iterdir()) == []
