"""A NaN loss stops training with a clear error; the last good checkpoint stays the latest."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import mp_workers  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.distributed   # spawns a gloo worker process


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out, result = tmp_path / "run", tmp_path / "result.json"
    mp_workers.spawn(mp_workers.diverging_worker, 1, str(out), str(result))
    error = json.loads(result.read_text())["error"]
    assert error is not None, "training did not stop on a NaN loss"
    assert "loss is nan at step 4" in error and "iter_0000002" in error
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
