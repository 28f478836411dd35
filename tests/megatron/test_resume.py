"""Kill -9 a training run after a checkpoint; the resumed run's losses equal an uninterrupted run's."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("mp_workers.py")
REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 8, 3


def _run(out, *, wait=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), str(STEPS), str(SAVE_EVERY), "0.1"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    return proc


def _losses(out):
    lines = (Path(out) / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    full = tmp_path / "uninterrupted"
    _run(full)
    reference = _losses(full)
    assert sorted(reference) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    proc = _run(killed, wait=False)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and "iter_0000003" in latest.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its checkpoint-writer helpers
    proc.wait()
    done = _losses(killed)
    assert max(done) < STEPS, "the run finished before it was killed; the test proves nothing"

    _run(killed)  # --resume auto
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]!r} != {reference[step]!r}"
    complete = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert complete[-1] == f"iter_{STEPS:07d}"
