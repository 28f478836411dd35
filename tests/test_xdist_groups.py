"""tools/run_tests.sh runs pytest with two xdist workers and `--dist loadgroup`: every test file
is one group (tests/conftest.py), so a file's module fixtures are built once. Two things broke
that silently before: the group marks added after xdist's own collection hook had read them, and
pytest 9 (node ids in Node._id, which xdist 3.8 does not update). Here the real suite's conftest
runs one file of many tests on two workers; all of them must land on one worker, as its group."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILE = "tests/pipeline/test_cost_throughput.py"


def test_a_test_file_runs_on_one_worker_as_one_group():
    pytest.importorskip("xdist")
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", FILE, "-k", "bad_cost"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "1000"})     # whole node ids in -v lines
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    passed = re.findall(r"^\[(gw\d)\].*PASSED (.+?)\s*$", out.stdout, re.M)
    assert len(passed) >= 5, out.stdout[-2000:]
    assert {worker for worker, _ in passed} == {passed[0][0]}, passed       # one worker
    assert all(nodeid.endswith("@" + FILE) for _, nodeid in passed), passed  # its file's group
