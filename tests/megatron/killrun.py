"""SIGKILL-then-resume machinery shared by the resume tests (fp32 here, bf16 in tests/training)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(argv, *, wait=True):
    """Start `python argv...` in its own session (so SIGKILL reaches its checkpoint helpers)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, *map(str, argv)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    return proc


def losses(out):
    lines = (Path(out) / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def check_sigkill_resume(tmp_path, argv_for, *, steps: int, kill_after: int) -> dict[int, float]:
    """Run uninterrupted; run again, SIGKILL it once checkpoint `kill_after` is complete, resume
    it; assert every step's loss equals the uninterrupted run's exactly. Returns the losses."""
    full = tmp_path / "uninterrupted"
    run(argv_for(full))
    reference = losses(full)
    assert sorted(reference) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    proc = run(argv_for(killed), wait=False)
    latest = killed / "checkpoints" / "latest"
    name = f"iter_{kill_after:07d}"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and name in latest.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its checkpoint-writer helpers
    proc.wait()
    done = losses(killed)
    assert max(done) < steps, "the run finished before it was killed; the test proves nothing"

    run(argv_for(killed))  # --resume auto
    resumed = losses(killed)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]!r} != {reference[step]!r}"
    complete = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert complete[-1] == f"iter_{steps:07d}"
    return reference
