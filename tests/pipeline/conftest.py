"""Launcher tests: the project's local SLURM cluster as a fixture (skipped when unreachable)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from launch_helpers import DEFAULT_CONF, reachable


@pytest.fixture(scope="session")
def slurm_cluster():
    """Use the project's local cluster (launch/local_slurm/start.sh); skip if none is reachable."""
    if "SLURM_CONF" not in os.environ and Path(DEFAULT_CONF).exists():
        os.environ["SLURM_CONF"] = DEFAULT_CONF
    why = reachable()
    if why:
        pytest.skip(f"no SLURM cluster: {why}")
    p = subprocess.run(["sinfo", "-h", "-o", "%D %G"], capture_output=True, text=True)
    return p.stdout.strip()
