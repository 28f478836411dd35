"""Forest registry operations: create/open, add (merge), idempotency, remove, queries, snapshot."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path

import pytest
from forest_testutil import files_sha256, make_checkpoint, tree_digest

from megatron_btm.forest import ExpertRecord, Forest, ForestSnapshot, UnknownExpertError


@pytest.fixture
def forest(tmp_path):
    seed = make_checkpoint(tmp_path / "src" / "seed", seed=0)
    return Forest.create(tmp_path / "forest", seed_checkpoint=seed,
                         seed_meta={"steps": 7, "tokens": 700, "config": {"hidden_size": 32}},
                         domains_mix={"legal": 0.5, "bio": 0.5})


def add(forest, tmp_path, eid, *, domain=None, parents=(("seed", 1.0),), cycle=1, seed=None,
        **kw):
    seed = zlib.crc32(eid.encode()) if seed is None else seed  # distinct bytes per expert
    ckpt = make_checkpoint(tmp_path / "src" / eid, seed=seed)
    return forest.add_expert(eid, domain=domain or f"d-{eid}", checkpoint_dir=ckpt,
                             parents=list(parents), cycle=cycle, steps=5, tokens=500,
                             config={"lr": 1e-3}, **kw)


def test_create_records_seed_with_independent_checksums(forest, tmp_path):
    src = tmp_path / "src" / "seed"
    assert Forest.exists(forest.root) and not Forest.exists(tmp_path)
    seed = Forest.open(forest.root).seed()
    assert (seed.id, seed.domain, seed.cycle, seed.parents) == ("seed", "seed", 0, ())
    assert (seed.steps, seed.tokens, seed.config) == (7, 700, {"hidden_size": 32})
    assert seed.extra["domains_mix"] == {"legal": 0.5, "bio": 0.5}
    assert seed.checkpoint_sha256 == tree_digest(src)
    path = forest.seed_checkpoint_path()
    assert files_sha256(path) == files_sha256(src)  # a byte-identical copy; the source is kept
    meta = json.loads((forest.root / "seed" / "meta.json").read_text())
    assert meta["files"] == files_sha256(src) and meta["checkpoint_format"] == "torch_dist"
    assert forest.experts() == [] and forest.domains() == []


def test_create_refuses_existing_or_foreign_folder(forest, tmp_path):
    seed = tmp_path / "src" / "seed"
    with pytest.raises(FileExistsError, match="forest already exists"):
        Forest.create(forest.root, seed_checkpoint=seed, seed_meta={})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and not a forest"):
        Forest.create(foreign, seed_checkpoint=seed, seed_meta={})
    assert (foreign / "notes.txt").read_text() == "mine"


def test_open_reports_missing_or_corrupt_manifest(tmp_path, forest):
    with pytest.raises(FileNotFoundError, match="forest.json"):
        Forest.open(tmp_path / "nowhere")
    manifest = forest.root / "forest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"forest\.json: not valid JSON"):
        Forest.open(forest.root)
    doc = json.loads(text)
    doc["seed"].pop("checkpoint_sha256")
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"seed: missing key\(s\) \['checkpoint_sha256'\]"):
        Forest.open(forest.root)


def test_add_expert_copies_and_records(forest, tmp_path):
    rec = add(forest, tmp_path, "legal-c1", domain="legal")
    src = tmp_path / "src" / "legal-c1"
    assert rec == Forest.open(forest.root).get("legal-c1")
    assert (rec.domain, rec.cycle, rec.parents, rec.steps, rec.tokens) == \
        ("legal", 1, (("seed", 1.0),), 5, 500)
    assert rec.path == "experts/legal-c1" and rec.checkpoint_sha256 == tree_digest(src)
    ckpt = forest.checkpoint_path("legal-c1")
    assert ckpt == forest.root / "experts" / "legal-c1" / "checkpoint"
    assert files_sha256(ckpt) == files_sha256(src) and src.is_dir()
    meta = json.loads((ckpt.parent / "meta.json").read_text())
    assert meta["files"] == files_sha256(src)
    assert {k: meta[k] for k in ("id", "domain", "cycle", "parents")} == \
        {"id": "legal-c1", "domain": "legal", "cycle": 1,
         "parents": [{"id": "seed", "weight": 1.0}]}
    assert sorted(p.name for p in (forest.root / "experts").iterdir()) == ["legal-c1"]


def test_add_expert_move(forest, tmp_path):
    src = make_checkpoint(tmp_path / "src" / "m", seed=5)
    digest = tree_digest(src)
    rec = forest.add_expert("m", domain="news", checkpoint_dir=src, parents=[("seed", 1.0)],
                            cycle=1, steps=1, tokens=1, config={}, move=True)
    assert not src.exists() and rec.checkpoint_sha256 == digest
    assert tree_digest(forest.checkpoint_path("m")) == digest
    assert not (forest.root / "experts" / "m" / ".move-source").exists()
    with pytest.raises(FileNotFoundError, match="'m' is already registered"):  # a rerun says why
        forest.add_expert("m", domain="news", checkpoint_dir=src, parents=[("seed", 1.0)],
                          cycle=1, steps=1, tokens=1, config={}, move=True)


def test_merge_is_idempotent_for_identical_checkpoint(forest, tmp_path, caplog):
    first = add(forest, tmp_path, "e1", seed=11)
    again = make_checkpoint(tmp_path / "elsewhere", seed=11)  # same bytes, other folder
    with caplog.at_level(logging.WARNING, logger="megatron_btm.forest"):
        second = forest.add_expert("e1", domain="d-e1", checkpoint_dir=again,
                                   parents=[("seed", 1.0)], cycle=1, steps=5, tokens=500,
                                   config={"lr": 1e-3})
    assert second == first and [r.id for r in forest.experts()] == ["e1"]
    assert "already registered with an identical checkpoint" in caplog.text


def test_duplicate_id_with_different_checkpoint(forest, tmp_path):
    add(forest, tmp_path, "e1", seed=1)
    other = make_checkpoint(tmp_path / "other", seed=2)
    with pytest.raises(ValueError, match="duplicate expert id 'e1'"):
        forest.add_expert("e1", domain="x", checkpoint_dir=other, parents=[("seed", 1.0)],
                          cycle=1, steps=0, tokens=0, config={})
    assert forest.get("e1").checkpoint_sha256 == tree_digest(tmp_path / "src" / "e1")


@pytest.mark.parametrize("kw, match", [
    ({"parents": [("nobody", 1.0)]}, "unknown parent 'nobody'"),
    ({"parents": []}, "parents is empty"),
    ({"parents": [("seed", -0.5)]}, "weight of parent seed"),
    ({"parents": [("seed", float("nan"))]}, "must be a finite number"),
    ({"parents": [("seed", 0.5), ("seed", 0.5)]}, "same parent twice"),
    ({"cycle": 0}, "cycle=0: must be an integer >= 1"),
    ({"config": {"f": object()}}, "config: not JSON-serialisable"),
    ({"steps": -1}, "steps=-1"),
])
def test_add_expert_rejects_bad_arguments(forest, tmp_path, kw, match):
    args = dict(domain="d", checkpoint_dir=make_checkpoint(tmp_path / "c", seed=3),
                parents=[("seed", 1.0)], cycle=1, steps=0, tokens=0, config={})
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        forest.add_expert("e", **args)
    assert forest.experts() == [] and list((forest.root / "experts").iterdir()) == []


def test_parent_must_come_from_an_earlier_cycle(forest, tmp_path):
    add(forest, tmp_path, "a", cycle=1)
    with pytest.raises(ValueError, match="parent 'a' is from cycle 1"):
        add(forest, tmp_path, "b", parents=[("a", 1.0)], cycle=1)


def test_bad_checkpoint_folders(forest, tmp_path):
    kw = dict(domain="d", parents=[("seed", 1.0)], cycle=1, steps=0, tokens=0, config={})
    with pytest.raises(FileNotFoundError, match="nope: not found"):
        forest.add_expert("e", checkpoint_dir=tmp_path / "nope", **kw)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty: contains no files"):
        forest.add_expert("e", checkpoint_dir=tmp_path / "empty", **kw)
    with pytest.raises(ValueError, match="inside the forest"):
        forest.add_expert("e", checkpoint_dir=forest.seed_checkpoint_path(), **kw)


def test_unknown_expert_lists_known_ids(forest, tmp_path):
    add(forest, tmp_path, "a")
    for call in (forest.get, forest.remove, forest.lineage, forest.descendants, forest.verify,
                 forest.checkpoint_path):
        with pytest.raises(UnknownExpertError,
                           match=r"unknown expert 'zz'.*known experts: \['a'\]"):
            call("zz")
    with pytest.raises(KeyError):  # also a KeyError, for dict-like callers
        forest.get("zz")


def test_empty_forest(forest):
    assert forest.experts() == [] and forest.snapshot().ids == []
    with pytest.raises(ValueError, match=f"forest {forest.root} has no experts"):
        forest.require_experts()
    with pytest.raises(ValueError, match="seed cannot be removed"):
        forest.remove("seed")


def test_lineage_through_two_cycles(forest, tmp_path):
    add(forest, tmp_path, "a", cycle=1)
    add(forest, tmp_path, "b", cycle=1)
    add(forest, tmp_path, "c", parents=[("a", 0.7), ("b", 0.3)], cycle=2)
    add(forest, tmp_path, "d", parents=[("c", 1.0)], cycle=3)
    assert forest.lineage("c") == [("a", 0.7, 1), ("seed", 1.0, 2), ("b", 0.3, 1), ("seed", 1.0, 2)]
    assert forest.lineage("d")[:2] == [("c", 1.0, 1), ("a", 0.7, 2)]
    assert forest.lineage("seed") == []
    assert forest.descendants("a") == ["c", "d"] and forest.descendants("d") == []
    assert forest.descendants("seed") == ["a", "b", "c", "d"]
    assert [r.id for r in forest.require_experts()] == ["a", "b", "c", "d"]  # cycle, then id


def test_remove_warns_naming_descendants(forest, tmp_path):
    add(forest, tmp_path, "a", domain="legal")
    add(forest, tmp_path, "b", domain="bio")
    add(forest, tmp_path, "c", domain="news", parents=[("a", 0.5), ("b", 0.5)], cycle=2)
    with pytest.warns(UserWarning, match=r"removed expert 'a'.*\['c'\].*not complete unlearning"):
        assert forest.remove("a") == ["c"]
    assert [r.id for r in forest.experts()] == ["b", "c"] and forest.domains() == ["bio", "news"]
    assert not (forest.root / "experts" / "a").exists()
    hist = forest.removed()
    assert [(h["id"], h["domain"], h["descendants"]) for h in hist] == [("a", "legal", ["c"])]
    assert forest.lineage("c")[0] == ("a", 0.5, 1)  # lineage survives the removal
    assert forest.descendants("a") == ["c"]
    # a removed expert may still be named as a parent (it was one when the child branched)
    assert add(forest, tmp_path, "a2", parents=[("a", 1.0)], cycle=2).parents == (("a", 1.0),)
    with pytest.raises(ValueError, match="ids are never reused"):
        forest.add_expert("a", domain="legal", checkpoint_dir=tmp_path / "src" / "a",
                          parents=[("seed", 1.0)], cycle=1, steps=0, tokens=0, config={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaf has no descendants: no warning
        assert forest.remove("c") == [] and forest.remove("a2") == []


def test_queries_by_domain(forest, tmp_path):
    add(forest, tmp_path, "legal-1", domain="legal")
    add(forest, tmp_path, "bio-1", domain="bio")
    add(forest, tmp_path, "legal-2", domain="legal", parents=[("legal-1", 1.0)], cycle=2)
    assert [r.id for r in forest.by_domain("legal")] == ["legal-1", "legal-2"]
    assert forest.by_domain("none") == [] and forest.domains() == ["bio", "legal"]


def test_snapshot_is_frozen_and_round_trips(forest, tmp_path):
    add(forest, tmp_path, "a")
    snap = forest.snapshot()
    add(forest, tmp_path, "b", parents=[("a", 1.0)], cycle=2)
    assert snap.ids == ["a"] and "a" in snap and "b" not in snap
    assert forest.snapshot(before_cycle=2).ids == ["a"] and forest.snapshot().ids == ["a", "b"]
    back = ForestSnapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert back == snap and back.get("a") == forest.get("a")


def test_record_round_trip_and_errors(forest, tmp_path):
    rec = add(forest, tmp_path, "a")
    assert ExpertRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    d = rec.to_dict()
    with pytest.raises(ValueError, match=r"src: missing key\(s\) \['domain'\]"):
        ExpertRecord.from_dict({k: v for k, v in d.items() if k != "domain"}, source="src")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        ExpertRecord.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="checkpoint_sha256='abc'"):
        ExpertRecord.from_dict({**d, "checkpoint_sha256": "abc"})


def test_create_moving_the_seed(tmp_path):
    src = make_checkpoint(tmp_path / "seed", seed=4)
    digest = tree_digest(src)
    forest = Forest.create(tmp_path / "f", seed_checkpoint=src, seed_meta={}, copy=False)
    assert not src.exists() and tree_digest(forest.seed_checkpoint_path()) == digest


@pytest.mark.parametrize("meta, match", [
    ({"steps": -3}, r"seed_meta\['steps'\]=-3"),
    ({"tokens": "many"}, r"seed_meta\['tokens'\]='many'"),
    ({"config": [1, 2]}, r"seed_meta\['config'\]"),
    ({"x": {1, 2}}, "seed_meta: not JSON-serialisable"),
])
def test_create_rejects_bad_seed_meta(tmp_path, meta, match):
    src = make_checkpoint(tmp_path / "seed", seed=4)
    with pytest.raises(ValueError, match=match):
        Forest.create(tmp_path / "f", seed_checkpoint=src, seed_meta=meta)
    assert not Forest.exists(tmp_path / "f") and tree_digest(src)  # source untouched


def test_move_across_filesystems_copies_then_deletes(forest, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a different filesystem than the test's tmp dir")
    other_fs = Path(tempfile.mkdtemp(dir=shm))
    try:
        src = make_checkpoint(other_fs / "ck", seed=8)
        digest = tree_digest(src)
        rec = forest.add_expert("x", domain="x", checkpoint_dir=src, parents=[("seed", 1.0)],
                                cycle=1, steps=0, tokens=0, config={}, move=True)
        assert rec.checkpoint_sha256 == digest and not src.exists()
        assert forest.verify("x") == ["x"]
    finally:
        shutil.rmtree(other_fs, ignore_errors=True)
