"""Helper processes end with their parent: Megatron's checkpoint-writer Manager (started by
utils.proc with die_with_parent) does not outlive a SIGKILLed training process."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from proc_helpers import alive, outlives

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


def test_checkpoint_writer_manager_dies_with_a_sigkilled_parent():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        manager = int(child.stdout.readline())
        assert alive(manager)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not outlives(manager, 60), f"Manager {manager} outlived its SIGKILLed parent"
