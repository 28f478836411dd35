"""Training logs to a JSONL file, TensorBoard event files and an offline wandb run."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import mp_workers  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.distributed   # spawns a gloo worker process


def test_tensorboard_and_offline_wandb_files(tmp_path):
    out = tmp_path / "run"
    mp_workers.spawn(mp_workers.logging_worker, 1, str(out))
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs, f"no offline wandb run under {out / 'wandb'}"
    assert list(runs[0].glob("run-*.wandb"))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert any("valid/v" in r for r in log)
