"""Atomic file and directory writes, checksums: nothing half-written ever looks complete.

Every writer in the project goes through these: a file is written to a temporary name in the
same directory, fsynced, then renamed over the target (rename is atomic on POSIX filesystems,
including NFS/Lustre for same-directory renames); a directory is built under a temporary name
and renamed into place as the last step.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

TMP_PREFIX = ".tmp-"
PROCESS_START = time.time()  # staging older than this, held by nobody, is a killed run's


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: str | os.PathLike, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give them the modes a plain open/mkdir would
    (other users of a shared cluster filesystem must be able to read forests and data)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    _default_mode(tmp, directory=False)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` when the block succeeds.

    On an exception (or SIGKILL) the temporary directory is left under a `.tmp-` name that no
    reader treats as complete; `cleanup_stale_tmp` removes such leftovers.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale_staging(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: already exists (refusing to overwrite)")
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    _default_mode(tmp, directory=True)
    held = try_lock(tmp)  # a live writer's staging: cleanup_stale_staging leaves it alone
    try:
        yield tmp
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old-" + final.name + ".", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if held is not None:
            os.close(held)


TAKEN, HELD, UNSUPPORTED = "taken", "held", "unsupported"


def flock_nb(fd: int) -> str:
    """A non-blocking exclusive flock on an open fd: TAKEN, HELD (another process has it) or
    UNSUPPORTED (a filesystem that cannot lock). The one flock primitive of the project's
    lock-or-ask helpers (the forest's waiting lock is forest/lock.py)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return TAKEN
    except BlockingIOError:
        return HELD
    except OSError as e:
        return HELD if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else UNSUPPORTED


def try_lock(path: str | os.PathLike) -> int | None:
    """A non-blocking exclusive flock on an existing file or folder: the fd if taken (held until
    the caller closes it), else None (held by someone else, absent, or a filesystem that cannot
    lock it). Used to hold a staging folder and to ask "is its writer still alive?"."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    if flock_nb(fd) == TAKEN:
        return fd
    os.close(fd)
    return None


def _held_by_someone(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        state = flock_nb(fd)
    finally:
        os.close(fd)
    if state == UNSUPPORTED:  # no folder locks here: assume alive unless an hour old
        return time.time() - folder.stat().st_mtime < 3600
    return state == HELD


def stale_staging(final: str | os.PathLike) -> list[Path]:
    """The `.tmp-<name>.*` (and `.tmp-old-<name>.*`) folders of killed writers beside `final`:
    no live process holds them and they are older than this process's start."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    out = []
    for p in sorted(final.parent.glob(f"{TMP_PREFIX}*")):
        if not p.name.startswith((f"{TMP_PREFIX}{final.name}.", f"{TMP_PREFIX}old-{final.name}.")):
            continue
        try:
            if not p.is_dir() or p.stat().st_mtime >= PROCESS_START:
                continue
        except FileNotFoundError:
            continue
        if not _held_by_someone(p):
            out.append(p)
    return out


def cleanup_stale_staging(final: str | os.PathLike) -> list[Path]:
    """Remove `stale_staging(final)`: every atomic_dir writer (average, preprocess, export-hf,
    ...) calls this first, so a SIGKILLed run's partial output never stays behind."""
    removed = stale_staging(final)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def cleanup_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove `.tmp-*` leftovers of interrupted writes in `directory`; return what was removed."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(directory: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of every regular file under `directory` (sorted, stable)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}
