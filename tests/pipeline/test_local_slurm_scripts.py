"""launch/local_slurm/{start,stop}.sh, checked without touching the running cluster: syntax, the
defaults tools/run_tests.sh relies on, and the cluster shape the BTM tests need."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parents[2] / "launch" / "local_slurm"


@pytest.mark.parametrize("name", ["start.sh", "stop.sh"])
def test_script_is_valid_bash_and_executable(name):
    p = DIR / name
    assert p.stat().st_mode & 0o111, f"{p} not executable (run_tests.sh only starts an executable one)"
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_start_defaults_and_cluster_shape():
    text = (DIR / "start.sh").read_text()
    assert "ROOT=${SLURM_ROOT:-/tmp/btm-slurm}" in text            # = run_tests.sh's SLURM_CONF
    assert re.search(r"NNODES=\$\{SLURM_NODES:-16\}", text) and re.search(r"NGPU=\$\{SLURM_FAKE_GPUS:-4\}", text)
    assert "DependencyParameters=kill_invalid_depend" in text
    assert "apt-get update" in text and "slurmctld slurmd slurm-client" in text
    assert 'bash "$HERE/stop.sh"' in text                          # idempotent: stops a previous one
    assert "ln -s /dev/null" in text                                 # fake GPUs are device links


def test_stop_kills_by_pid_file_only():
    text = (DIR / "stop.sh").read_text()
    assert "pkill" not in text and "killall" not in text
    assert "scancel" in text.split("stop()")[-1].split("for f in")[0]   # jobs cancelled before daemons
