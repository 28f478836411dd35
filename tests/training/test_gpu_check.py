"""tools/gpu_check.sh --cpu-dry-run: every step of the prepared GPU check that needs no GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_flops_per_token_is_megatrons_count():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_train
    m = gpu_train.GPT2_SMALL
    L, h, s, V = m["num_layers"], m["hidden_size"], m["seq_length"], 50304
    # 6 FLOPs per weight per token for the 12·L·h² layer weights, the attention scores and
    # values (12·L·h·s), and the output layer (6·h·V)
    assert gpu_train.flops_per_token(m, V) == pytest.approx(72 * L * h * h + 12 * L * h * s + 6 * h * V)


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu-dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"wheels": "ok", "env": "ok", "build": "skipped", "pytest": "ok",
                      "mixing": "ok", "train": "ok"}
    assert summary["dry_run"] and summary["ok"]
    for step in ("wheels", "env", "pytest", "mixing", "train"):
        assert (out / f"{step}.log").stat().st_size > 0
    wheels = (out / "wheels.log").read_text()
    assert "megatron-core==0.16.1" in wheels  # present or listed as missing
    pytest_log = (out / "pytest.log").read_text()
    assert "deselected" in pytest_log and " skipped" in pytest_log  # gpu tests selected, skipped
    train = json.loads((out / "gpu_train.json").read_text())
    assert train["tokens_per_s"] > 0 and train["device_choices"]["device"] == "cpu"
    assert train["mfu"] == pytest.approx(train["tokens_per_s"] * train["flops_per_token"] / 989e12)
    log = [json.loads(x) for x in Path(train["train_log"]).read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]


def test_bad_argument_is_refused():
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--gpu"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: tools/gpu_check.sh" in proc.stderr
