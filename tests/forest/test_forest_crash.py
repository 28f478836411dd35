"""SIGKILL in the middle of a merge (or remove, or create) never leaves a partial entry.

The worker process pauses at a named phase (BTM_FOREST_TEST_PAUSE_AT) and is killed there. The
forest must then read exactly as before (or, past the commit point, as after), and rerunning
the operation must complete and leave no leftovers.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from forest_testutil import files_sha256, make_checkpoint, start_worker, tree_digest, worker_env

from megatron_btm.forest import Forest

ADD_PHASES = ["staged", "locked", "renamed", "committed"]


def kill_at(proc: subprocess.Popen, signal_file) -> None:
    """Wait until `proc` announces its pause, then SIGKILL it."""
    deadline = time.monotonic() + 120
    while not signal_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited before pausing: {proc.communicate()}")
        assert time.monotonic() < deadline, "worker never reached its pause point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def forest(tmp_path):
    f = Forest.create(tmp_path / "forest", seed_checkpoint=make_checkpoint(tmp_path / "s", 0),
                      seed_meta={})
    f.add_expert("base", domain="base", checkpoint_dir=make_checkpoint(tmp_path / "b", 1),
                 parents=[("seed", 1.0)], cycle=1, steps=1, tokens=1, config={})
    return f


@pytest.mark.parametrize("phase, move", [(p, False) for p in ADD_PHASES] +
                         [("staged", True), ("renamed", True)])
def test_sigkill_during_merge(forest, tmp_path, phase, move):
    manifest_before = (forest.root / "forest.json").read_bytes()
    src = make_checkpoint(tmp_path / "src" / "new", 7)
    digest, files = tree_digest(src), files_sha256(src)
    sig = tmp_path / "paused"
    proc = start_worker(forest.root, "new", "news", src, *(["--move"] if move else []),
                        BTM_FOREST_TEST_PAUSE_AT=phase, BTM_FOREST_TEST_PAUSE_SIGNAL=str(sig))
    kill_at(proc, sig)

    after = Forest.open(forest.root)  # still opens
    if phase == "committed":  # killed after the commit point: fully present
        assert [r.id for r in after.experts()] == ["base", "new"]
        assert after.get("new").checkpoint_sha256 == digest and after.verify() == \
            ["seed", "base", "new"]
    else:  # before it: exactly the old forest, no entry for "new"
        assert (forest.root / "forest.json").read_bytes() == manifest_before
        assert [r.id for r in after.experts()] == ["base"] and after.verify() == ["seed", "base"]
    if move and phase != "committed":
        assert not src.exists()  # it sits inside the forest until the next write recovers it
        after.recover()
        assert files_sha256(src) == files  # moved back, intact
    # rerunning the merge completes (or, after the commit point, is a no-op)
    rec = after.add_expert("new", domain="news", checkpoint_dir=src, parents=[("seed", 1.0)],
                           cycle=1, steps=10, tokens=1000, config={"worker": "new"}, move=move)
    assert rec.checkpoint_sha256 == digest and after.verify() == ["seed", "base", "new"]
    if phase == "committed":
        # the no-op rerun writes nothing, so the dead merge's staging lock file is still
        # there (ignored by readers); the next write cleans it
        assert [n for n in listing(forest.root / "experts") if n.startswith(".")] == \
            [n for n in listing(forest.root / "experts") if n.startswith(".tmp-new.")]
        after.recover()
    assert listing(forest.root / "experts") == ["base", "new"]  # no leftovers of the killed run
    assert listing(forest.root) == [".lock", "experts", "forest.json", "seed"]


def test_sigkill_during_remove(forest, tmp_path):
    code = ("from megatron_btm.forest import Forest; import sys; "
            "Forest.open(sys.argv[1]).remove('base')")
    sig = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", code, str(forest.root)],
                            env=worker_env(BTM_FOREST_TEST_PAUSE_AT="remove_committed",
                                           BTM_FOREST_TEST_PAUSE_SIGNAL=str(sig)))
    kill_at(proc, sig)
    after = Forest.open(forest.root)
    assert after.experts() == [] and [h["id"] for h in after.removed()] == ["base"]
    after.recover()  # the unlisted folder of the removed expert goes with the next write
    assert listing(forest.root / "experts") == []


def test_sigkill_during_create(tmp_path):
    root, seed = tmp_path / "forest", make_checkpoint(tmp_path / "s", 0)
    code = ("from megatron_btm.forest import Forest; import sys; "
            "Forest.create(sys.argv[1], seed_checkpoint=sys.argv[2], seed_meta={})")
    sig = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(seed)],
                            env=worker_env(BTM_FOREST_TEST_PAUSE_AT="create_renamed",
                                           BTM_FOREST_TEST_PAUSE_SIGNAL=str(sig)))
    kill_at(proc, sig)
    assert not Forest.exists(root)
    with pytest.raises(FileNotFoundError):
        Forest.open(root)
    forest = Forest.create(root, seed_checkpoint=seed, seed_meta={})  # rerun completes
    assert forest.seed().checkpoint_sha256 == tree_digest(seed) and forest.verify() == ["seed"]
    assert listing(root) == [".lock", "experts", "forest.json", "seed"]


def test_sigkill_while_copying_leaves_live_stagings_alone(forest, tmp_path):
    """Cleanup after a crash must not delete the staging folder of a merge still running."""
    sig = tmp_path / "paused"
    src = make_checkpoint(tmp_path / "src" / "slow", 9)
    alive = start_worker(forest.root, "slow", "slow", src, BTM_FOREST_TEST_PAUSE_AT="staged",
                         BTM_FOREST_TEST_PAUSE_SIGNAL=str(sig))
    try:
        deadline = time.monotonic() + 120
        while not sig.exists():
            assert alive.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        staged = [p for p in (forest.root / "experts").iterdir() if p.name.startswith(".tmp-slow")]
        forest.recover()
        assert all(p.exists() for p in staged) and len(staged) == 2  # folder + its lock file
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait(timeout=30)
    forest.recover()  # now its owner is dead: cleaned
    assert listing(forest.root / "experts") == ["base"]
    assert os.path.isdir(src)
