"""A stand-in `btm` for launcher tests: records how it was called, sleeps, can fail on demand.

Tests write it into a bin/ folder put first on PATH by the plan's env_setup, so the real
generated sbatch scripts run under the real scheduler without training anything.
Each call appends one JSON line to $FAKE_BTM_DIR/calls.jsonl:
{argv, start, end, job, task, node, cvd, procid, ntasks, master_addr, master_port, restart,
barrier_ok}. With $FAKE_BTM_BARRIER=N each train-expert waits until N of them have started.
It fails (exit 3) when the stage is train-expert and the domain is listed in
$FAKE_BTM_DIR/fail_domains (one a line). $FAKE_BTM_SLEEP seconds of "work" (default 0).
"""
import json
import os
import sys
import time
from pathlib import Path

TEMPLATE = """#!{python}
import runpy, sys
sys.argv[0] = "btm"
runpy.run_path({script!r}, run_name="__main__")
"""


def install(bin_dir: Path) -> Path:
    """Write an executable `btm` in bin_dir that runs this file."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "btm"
    exe.write_text(TEMPLATE.format(python=sys.executable, script=str(Path(__file__).resolve())))
    exe.chmod(0o755)
    return exe


def read_calls(fake_dir: Path) -> list[dict]:
    f = Path(fake_dir) / "calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def merged(calls: list[dict]) -> list[tuple[str, str]]:
    """(domain, cycle) of every expert run registered by the `merge --cycle C --run R...` calls."""
    out = []
    for c in calls:
        a = c["argv"]
        if a[0] == "merge" and "--cycle" in a:
            out += [(a[i + 1].rsplit("/", 1)[-1], a[a.index("--cycle") + 1])
                    for i, x in enumerate(a) if x == "--run"]
    return out


def _opt(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def main() -> int:
    d = Path(os.environ["FAKE_BTM_DIR"])
    argv = sys.argv[1:]
    start = time.time()
    barrier_ok = None
    if argv[0].startswith("train"):   # visible while running: tests wait for it (e.g. to requeue)
        tag = f"{argv[0]}-{os.environ.get('SLURM_JOB_ID')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}-{os.getpid()}"
        (d / f"started-{tag}").write_text(json.dumps(argv))
    if argv[0] == "train-expert" and os.environ.get("FAKE_BTM_BARRIER"):
        # Concurrency proof that does not depend on speed: wait until N experts are running at
        # once (only possible if they really are); give up after 60 s and record it.
        n, deadline = int(os.environ["FAKE_BTM_BARRIER"]), time.time() + 60
        while len(list(d.glob("started-train-expert-*"))) < n and time.time() < deadline:
            time.sleep(0.05)
        barrier_ok = len(list(d.glob("started-train-expert-*"))) >= n
    time.sleep(float(os.environ.get("FAKE_BTM_SLEEP", "0")) if argv[0].startswith("train") else 0)
    fail = (d / "fail_domains").read_text().split("\n") if (d / "fail_domains").exists() else []
    failed = argv[0] == "train-expert" and _opt(argv, "--domain") in fail
    e = os.environ.get
    rec = {"argv": argv, "start": start, "end": time.time(), "job": e("SLURM_JOB_ID"),
           "task": e("SLURM_ARRAY_TASK_ID"), "node": e("SLURMD_NODENAME"),
           "cvd": e("CUDA_VISIBLE_DEVICES"), "procid": e("SLURM_PROCID"), "ntasks": e("SLURM_NTASKS"),
           "master_addr": e("MASTER_ADDR"), "master_port": e("MASTER_PORT"),
           "restart": e("SLURM_RESTART_COUNT"), "failed": failed, "barrier_ok": barrier_ok}
    with open(d / "calls.jsonl", "a") as f:   # one short line per append: atomic enough here
        f.write(json.dumps(rec) + "\n")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
