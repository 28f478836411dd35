"""Fault injection on the in-process and local executors, real pico training: one expert of
cycle 1 fails (test switch) or the driver is killed with SIGKILL mid-cycle; then `btm resume`
finishes the run, and the forest (ids, cycles, parents, weights) and every expert's weights
equal those of an uninterrupted run of the same plan, bitwise."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import REPO, assert_same_forest, btm, forest_summary, make_data, plan_dict

from megatron_btm.pipeline.nodes import FAIL_ENV

pytestmark = [pytest.mark.slow]
FAIL = "cycle1-train-legal"


@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_data(corpora, root)
    f = root / "ref.yaml"
    f.write_text(yaml.safe_dump(plan_dict(root / "ref", data)))
    btm("run", f, "--executor", "inprocess")
    return root, data, forest_summary(root / "ref")


def _plan(root: Path, data: Path, name: str) -> Path:
    f = root / f"{name}.yaml"
    f.write_text(yaml.safe_dump(plan_dict(root / name, data)))
    return f


@pytest.mark.parametrize("executor", ["inprocess", "local"])
def test_failed_expert_then_resume_equals_uninterrupted(reference, executor):
    root, data, want = reference
    plan = _plan(root, data, f"fail-{executor}")
    out = btm("run", plan, "--executor", executor, "--parallel", "2", env={FAIL_ENV: FAIL}, check=False)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and FAIL in out.stderr.splitlines()[-1]
    run = root / f"fail-{executor}"
    done = {p.stem for p in (run / "graph" / "done").glob("*.json")}
    assert "cycle1-merge" not in done and not any(d.startswith("cycle2") for d in done)
    assert {"cycle1-train-bible", "cycle1-train-code_c"} <= done   # its siblings finished
    status = btm("status", plan).stdout
    assert f"failed nodes: {FAIL}" in status and "run incomplete" in status
    rows = json.loads(btm("status", plan, "--json").stdout)
    assert [r["node"] for r in rows if r["state"] == "failed"] == [FAIL]
    btm("resume", plan, "--executor", executor, "--parallel", "2")
    assert btm("status", plan).stdout.rstrip().endswith("run complete")
    assert_same_forest(forest_summary(run), want)


@pytest.mark.parametrize("executor", ["inprocess", "local"])
def test_driver_sigkill_mid_cycle_then_resume_equals_uninterrupted(reference, executor):
    root, data, want = reference
    plan = _plan(root, data, f"kill-{executor}")
    run = root / f"kill-{executor}"
    driver = subprocess.Popen([sys.executable, "-m", "megatron_btm.cli", "run", str(plan),
                               "--executor", executor], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    # kill when an expert of cycle 1 has saved a checkpoint but is not done
    latest = run / "cycle1" / "experts" / "bible" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists():
        assert driver.poll() is None and time.time() < deadline, "driver ended before the kill"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1)   # local: the node processes die with the driver (PR_SET_PDEATHSIG)
    assert not (run / "graph" / "done" / "cycle1-merge.json").exists()
    btm("resume", plan, "--executor", executor)
    assert_same_forest(forest_summary(run), want)
