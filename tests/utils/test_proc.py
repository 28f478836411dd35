"""Helper processes end with their parent: Megatron's checkpoint-writer Manager (started by
utils.proc with die_with_parent) does not outlive a SIGKILLed training process."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = """
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
from megatron_btm.utils import proc
proc.install_checkpoint_results_queue()
proc.install_checkpoint_results_queue()            # idempotent: one Manager
q = fa._get_write_results_queue()                  # what Megatron's writer will use
q.put("ok"); assert q.get() == "ok"
print(proc._QUEUE_MANAGER._process.pid, flush=True)
import time; time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_checkpoint_writer_manager_dies_with_a_sigkilled_parent():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        manager = int(child.stdout.readline())
        assert _alive(manager)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 60
    while _alive(manager) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(manager), f"Manager {manager} outlived its SIGKILLed parent"
