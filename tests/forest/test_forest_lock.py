"""The forest lock: exclusive, times out with the lock path named, released when a holder dies."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from forest_testutil import make_checkpoint, worker_env

from megatron_btm.forest import Forest, ForestLock, ForestLockTimeout


def test_timeout_names_the_lock_path(tmp_path):
    with ForestLock(tmp_path):
        with pytest.raises(ForestLockTimeout, match=rf"{tmp_path}/\.lock: could not lock"):
            ForestLock(tmp_path, timeout_s=0.1).acquire()
    with ForestLock(tmp_path, timeout_s=0):  # free again after release
        pass
    with pytest.raises(ValueError, match="timeout_s"):
        ForestLock(tmp_path, timeout_s=-1)


def test_writes_wait_for_the_lock(tmp_path):
    forest = Forest.create(tmp_path / "f", seed_checkpoint=make_checkpoint(tmp_path / "s", 0),
                           seed_meta={}, lock_timeout_s=0.2)
    with ForestLock(forest.root):
        with pytest.raises(ForestLockTimeout):
            forest.add_expert("e", domain="d", checkpoint_dir=make_checkpoint(tmp_path / "c", 1),
                              parents=[("seed", 1.0)], cycle=1, steps=0, tokens=0, config={})
    assert forest.experts() == [] and list((forest.root / "experts").iterdir()) == []


def test_lock_released_when_holder_is_killed(tmp_path):
    code = ("import sys, time; from megatron_btm.forest import ForestLock; "
            f"l = ForestLock({str(tmp_path)!r}); l.acquire(); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], env=worker_env(), stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(ForestLockTimeout):
            ForestLock(tmp_path, timeout_s=0.1).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    with ForestLock(tmp_path, timeout_s=10):
        pass
