"""Process lifetime: helper processes end with the process that started them.

Light on purpose (no torch, no Megatron): a spawned process imports this module to run
`die_with_parent` as its initializer."""
from __future__ import annotations

import ctypes
import os
import signal


def die_with_parent() -> None:
    """This process ends when its parent does (even on SIGKILL: PR_SET_PDEATHSIG): nothing
    keeps training behind a dead driver, and `btm resume` never races an orphan. Used for node
    processes, for `btm node` under torchrun (whose workers, in their own session, would
    outlive a SIGKILLed torchrun) and for Megatron's checkpoint-writer Manager process."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:   # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


_QUEUE_MANAGER = None


def install_checkpoint_results_queue() -> None:
    """Megatron's torch_dist writer (filesystem_async) lazily starts a spawned
    multiprocessing Manager for its write-results queue and never stops it; when the training
    process is SIGKILLed that Manager (~270 MB with torch imported) lives on as an orphan.
    Start it here instead, with `die_with_parent` as its initializer. Idempotent."""
    global _QUEUE_MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    if getattr(fa, "_results_queue", None) is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager
    _QUEUE_MANAGER = SyncManager(ctx=mp.get_context("spawn"))
    _QUEUE_MANAGER.start(initializer=die_with_parent)
    fa._results_queue = _QUEUE_MANAGER.Queue()
