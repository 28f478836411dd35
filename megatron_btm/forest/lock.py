"""The forest's write lock: `fcntl.flock` on `<root>/.lock`, with a timeout and clear errors.

Why flock: the kernel releases it when the holder dies (SIGKILL, node reboot on NFSv4 lease
expiry), so a crashed merge never leaves the forest locked forever, unlike a lock *file*.
Filesystem caveats: on Linux NFS (v3 with lockd, v4 natively) flock is emulated with POSIX
byte-range locks and works across clients; Lustre needs the `-o flock` mount option (else the
call fails with ENOSYS/EOPNOTSUPP, reported below); some FUSE mounts silently lock only locally.
Put the forest on a filesystem where these hold, or run all merges from one node.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from megatron_btm.forest.records import ForestLockTimeout

LOCK_NAME = ".lock"
DEFAULT_TIMEOUT_S = float(os.environ.get("BTM_FOREST_LOCK_TIMEOUT", "600"))


class ForestLock:
    """Exclusive, non-reentrant lock on a forest; use as `with ForestLock(root): ...`.

    Two ForestLock objects conflict even inside one process (each opens its own file
    description), so threads are serialised too.
    """

    def __init__(self, root: str | os.PathLike, timeout_s: float | None = None) -> None:
        self.path = Path(root) / LOCK_NAME
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        if not self.timeout_s >= 0:
            raise ValueError(f"lock timeout_s={timeout_s!r}: must be >= 0")
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: lock already held by this object (not reentrant)")
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
        deadline = time.monotonic() + self.timeout_s
        delay = 0.005
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ForestLockTimeout(
                            f"{self.path}: could not lock the forest within {self.timeout_s:g} s "
                            "(another merge/remove holds it; raise BTM_FOREST_LOCK_TIMEOUT if "
                            "merges are slow)") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
                except OSError as e:
                    if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                        raise OSError(e.errno, f"{self.path}: this filesystem does not support "
                                      f"flock ({os.strerror(e.errno)}); on Lustre mount with "
                                      "-o flock, or put the forest on a filesystem with locking") \
                            from None
                    raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> ForestLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
