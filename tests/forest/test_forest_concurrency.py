"""Many merge jobs finishing at once: 16 processes register into one forest simultaneously."""
from __future__ import annotations

import json

from forest_testutil import make_checkpoint, start_worker, tree_digest

from megatron_btm.forest import Forest


def run_together(tmp_path, jobs):
    """Start one worker per (id, domain, checkpoint), release them at once, collect outputs."""
    go = tmp_path / "go"
    procs = [start_worker(tmp_path / "forest", eid, dom, ckpt, "--go", go)
             for eid, dom, ckpt in jobs]
    try:
        for p in procs:  # every interpreter is up and waiting before any merge starts
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out.strip(), err) for p, (out, err) in zip(procs, outs, strict=False)]


def new_forest(tmp_path):
    return Forest.create(tmp_path / "forest", seed_checkpoint=make_checkpoint(tmp_path / "s", 0),
                         seed_meta={})


def test_16_processes_merge_different_experts(tmp_path):
    forest = new_forest(tmp_path)
    jobs = [(f"e{i:02d}", f"dom{i:02d}", make_checkpoint(tmp_path / "src" / f"e{i:02d}", i + 1))
            for i in range(16)]
    results = run_together(tmp_path, jobs)
    for (eid, _, ckpt), (rc, out, err) in zip(jobs, results, strict=False):
        assert rc == 0 and out == f"ok {tree_digest(ckpt)}", (eid, out, err)
    doc = json.loads((forest.root / "forest.json").read_text())  # valid JSON, all 16 present
    assert sorted(doc["experts"]) == [eid for eid, _, _ in jobs]
    assert [r.id for r in forest.experts()] == [eid for eid, _, _ in jobs]
    assert forest.verify() == ["seed"] + [eid for eid, _, _ in jobs]  # every folder complete
    for eid, dom, ckpt in jobs:
        rec = forest.get(eid)
        assert (rec.domain, rec.config, rec.checkpoint_sha256) == (dom, {"worker": eid},
                                                                  tree_digest(ckpt))
    # no leftovers: no staging folders, no staging lock files
    assert sorted(p.name for p in (forest.root / "experts").iterdir()) == [e for e, _, _ in jobs]


def test_same_expert_merged_by_several_jobs_is_registered_once(tmp_path):
    forest = new_forest(tmp_path)
    # four copies of one trained expert (same bytes, different folders), e.g. a resubmitted job
    jobs = [("legal", "legal", make_checkpoint(tmp_path / "src" / f"copy{i}", 42))
            for i in range(4)]
    results = run_together(tmp_path, jobs)
    digest = tree_digest(jobs[0][2])
    assert all(rc == 0 and out == f"ok {digest}" for rc, out, _ in results), results
    assert [r.id for r in forest.experts()] == ["legal"]
    assert sorted(p.name for p in (forest.root / "experts").iterdir()) == ["legal"]


def test_same_id_different_checkpoints_one_wins(tmp_path):
    forest = new_forest(tmp_path)
    jobs = [("legal", "legal", make_checkpoint(tmp_path / "src" / f"v{i}", 100 + i))
            for i in range(4)]
    results = run_together(tmp_path, jobs)
    winners = [i for i, (rc, _, _) in enumerate(results) if rc == 0]
    assert len(winners) == 1, results
    for i, (rc, out, _) in enumerate(results):
        if i not in winners:
            assert rc == 1 and "duplicate expert id 'legal'" in out
    assert forest.get("legal").checkpoint_sha256 == tree_digest(jobs[winners[0]][2])
    assert forest.verify("legal") == ["legal"]
