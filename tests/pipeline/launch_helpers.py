"""Launcher test helpers: is a SLURM cluster reachable, mini plans, polling without sacct."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import fakebtm

DEFAULT_CONF = "/tmp/btm-slurm/etc/slurm.conf"


def reachable() -> str | None:
    """None when sinfo reaches a cluster, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not installed (run launch/local_slurm/start.sh)"
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not Path(conf).exists():   # sinfo would wait ~10 s on a DNS SRV lookup first
        return f"{conf} does not exist; run launch/local_slurm/start.sh"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if p.returncode != 0:
        return f"sinfo cannot reach a cluster ({p.stderr.strip()[:120]}); run launch/local_slurm/start.sh"
    return None


def mini_plan_dict(tmp: Path, fake_dir: Path | None = None, *, domains=(("a", "b"), ("c", "d")),
                   **cluster) -> dict:
    """A seed + cycles plan under tmp; with fake_dir, jobs call tests/launch/fakebtm.py as `btm`."""
    env = []
    if fake_dir is not None:
        bin_dir = fake_dir / "bin"
        fakebtm.install(bin_dir)
        env = [f"export PATH={bin_dir}:$PATH", f"export FAKE_BTM_DIR={fake_dir}",
               f"export FAKE_BTM_SLEEP={cluster.pop('sleep', 0)}",
               f"export FAKE_BTM_BARRIER={cluster.pop('barrier', '')}"]
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "train.yaml").exists():   # a valid training config (the fake btm ignores it)
        (tmp / "train.yaml").write_text("steps: 5\nmodel: {num_layers: 2, hidden_size: 32}\n")
        (tmp / "data").mkdir(exist_ok=True)   # what the plan check looks for (the fake reads nothing)
        (tmp / "data" / "tokenizer.json").write_text("{}")
    return {"name": "mini", "run_dir": str(tmp / "run"), "data_dir": str(tmp / "data"),
            "train_config": str(tmp / "train.yaml"),
            "cluster": {"gpus_per_expert": 4, "ntasks_per_expert": 1, "seed_ntasks_per_node": 1,
                        "cpus_per_task": 1, "master_addr": "127.0.0.1", "time_expert": "00:10:00",
                        "time_seed": "00:10:00", "time_stage": "00:10:00", "env_setup": env, **cluster},
            "seed": {"domains": sorted({d for c in domains for d in c})[:2], "steps": 2},
            "cycles": [{"domains": list(c), "steps": 3} for c in domains]}


def wait_idle(job_ids: list[str], timeout: float = 120) -> None:
    """Wait until none of job_ids (or their array tasks) is pending/running (squeue, no sacct)."""
    end = time.time() + timeout
    while time.time() < end:
        p = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)],
                           capture_output=True, text=True)
        if p.returncode == 0 and not p.stdout.strip():
            return
        time.sleep(0.5)
    raise TimeoutError(f"jobs {job_ids} still queued after {timeout} s: {p.stdout}")


def job_state(job_id: str) -> str:
    p = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True)
    for tok in p.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return "UNKNOWN"
