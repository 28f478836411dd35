"""Start reading checkpoint files from disk before the interpreter has imported torch.

`btm average` is read-bound on cold files (it streams every expert once), and importing torch
takes about a second. `start_readahead` asks the kernel (posix_fadvise WILLNEED, on a daemon
thread: the call can block while it queues I/O) to read the first part of each expert's DCP data
files, so that second of disk reading overlaps the imports. Only a bounded amount is requested
(`budget_bytes` in all), so large forests do not flush the page cache; the streaming reader's own
per-tensor prefetch takes over from there. Imports nothing heavy; a no-op where posix_fadvise
does not exist.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

DEFAULT_BUDGET = 1 << 30


def _advise(files_per_dir: list[list[Path]], per_dir: int) -> None:
    for files in files_per_dir:
        left = per_dir
        for f in files:
            if left <= 0:
                break
            try:
                size = f.stat().st_size
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue  # the reader reports missing or unreadable files by name
            try:
                n = min(size, left)
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_WILLNEED)
                left -= n
            except OSError:
                pass
            finally:
                os.close(fd)


def start_readahead(dirs: Sequence[str | os.PathLike], budget_bytes: int = DEFAULT_BUDGET
                    ) -> threading.Thread | None:
    """Queue reads of the first budget_bytes / len(dirs) bytes of each folder's *.distcp files
    (in name order) on a daemon thread; returns the thread, or None when there is nothing to do."""
    if not dirs or budget_bytes <= 0 or not hasattr(os, "posix_fadvise"):
        return None
    files = [sorted(Path(d).glob("*.distcp")) for d in dirs]
    if not any(files):
        return None
    t = threading.Thread(target=_advise, args=(files, budget_bytes // len(dirs)),
                         name="btm-readahead", daemon=True)
    t.start()
    return t
