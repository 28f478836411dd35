"""Getting a checkpoint folder into the forest without ever exposing half of it.

A folder is staged under `<parent>/.tmp-<name>.<uuid>/` (copied and hashed in one read pass, or
moved in with a rename) *outside* the forest lock, so 16 concurrent merges copy in parallel. The
stager holds an flock on the sibling file `.tmp-<name>.<uuid>.lock` for as long as it lives: a
`.tmp-` folder whose lock can be taken belongs to a dead process and is cleaned by the next
forest operation. A moved-in checkpoint is never lost: a `.move-source` note in the staging
folder says where it came from, and cleanup moves it back there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from megatron_btm.utils.io import TMP_PREFIX, atomic_write_text, fsync_dir, try_lock

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
MOVE_NOTE = ".move-source"
_CHUNK = 1 << 20


def _walk_files(root: Path) -> list[Path]:
    """Every regular file under `root`, sorted; symlinked directories are refused (they would
    make the recorded checksums depend on something outside the checkpoint)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise ValueError(f"checkpoint {root}: {os.path.join(dirpath, d)} is a symlink to a "
                                 "directory; copy the real files into the checkpoint")
        out.extend(Path(dirpath) / f for f in filenames)
    return sorted(out)


def hash_tree(root: str | os.PathLike) -> dict[str, str]:
    """{posix relative path: sha256} of every file under `root`."""
    import hashlib
    root = Path(root)
    files = {}
    for p in _walk_files(root):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
        files[p.relative_to(root).as_posix()] = h.hexdigest()
    return files


def copy_and_hash(src: Path, dst: Path) -> dict[str, str]:
    """Copy the tree `src` to the new folder `dst`, fsyncing every file and folder, and return
    the sha256 of every copied file (computed from the bytes written, in the same pass)."""
    import hashlib
    files = {}
    dst.mkdir()
    dirs = {dst}
    for p in _walk_files(src):
        rel = p.relative_to(src)
        out = dst / rel
        if out.parent not in dirs:
            out.parent.mkdir(parents=True, exist_ok=True)
            dirs.update([out.parent, *out.parent.parents])
        h = hashlib.sha256()
        with open(p, "rb") as fi, open(out, "wb") as fo:
            while block := fi.read(_CHUNK):
                h.update(block)
                fo.write(block)
            fo.flush()
            os.fsync(fo.fileno())
        shutil.copystat(p, out)
        files[rel.as_posix()] = h.hexdigest()
    for d in sorted(dirs, key=lambda d: -len(d.parts)):
        if d == dst or dst in d.parents:
            fsync_dir(d)
    return files


class Staging:
    """A `.tmp-` folder being filled by this process, protected by its flocked sibling file."""

    def __init__(self, parent: Path, name: str) -> None:
        base = f"{TMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}"
        self.dir = parent / base
        self.lock_path = parent / (base + ".lock")
        self.moved_from: Path | None = None  # set while a moved-in checkpoint sits in here
        self.copied_from_move: Path | None = None  # move requested, but copied (cross-device)
        # Lock the file under a name cleanup never looks at, then rename it into view: cleanup
        # can never see this staging's lock file unlocked while we are alive.
        hidden = parent / f".staging-{uuid.uuid4().hex}"
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, self.lock_path)
            self.dir.mkdir()
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(hidden)
            raise
        self._fd: int | None = fd

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT_DIR

    def fill(self, src: Path, *, move: bool) -> dict[str, str]:
        """Put `src` in as `checkpoint/`; return {relative path: sha256} of its files."""
        if move:
            note = self.dir / MOVE_NOTE   # whole or absent: a kill never leaves half a note
            atomic_write_text(note, json.dumps({"source": str(src.resolve())}))
            try:
                os.rename(src, self.checkpoint)
                self.moved_from = src.resolve()
                fsync_dir(self.dir)
                fsync_dir(src.resolve().parent)
                return hash_tree(self.checkpoint)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                note.unlink()
                self.copied_from_move = src  # other filesystem: copy now, delete after commit
        return copy_and_hash(src, self.checkpoint)

    def discard(self) -> None:
        """Undo: a moved-in checkpoint goes back where it came from; the folder is removed."""
        if self.moved_from is not None and self.checkpoint.exists():
            os.rename(self.checkpoint, self.moved_from)
            self.moved_from = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Give up the staging lock (after the folder was renamed into place or discarded)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)


def restore_moved(folder: Path) -> None:
    """If `folder` holds a checkpoint that was moved in (a `.move-source` note), move it back."""
    note = folder / MOVE_NOTE
    ckpt = folder / CHECKPOINT_DIR
    if not note.exists():
        return
    try:
        source = Path(json.loads(note.read_text())["source"])
    except (ValueError, KeyError, OSError):
        if not ckpt.exists():   # killed while writing the note, before anything moved in
            note.unlink()
            return
        log.warning("%s: unreadable move note; leaving %s in place", note, ckpt)
        raise
    if ckpt.exists() and source.parent.name.startswith(TMP_PREFIX) \
            and not source.parent.exists():  # a merge's staging copy, already cleaned: drop it
        shutil.rmtree(ckpt)
    elif ckpt.exists():
        target = source if not source.exists() else source.with_name(
            f"{source.name}.restored-{uuid.uuid4().hex[:8]}")
        os.rename(ckpt, target)
        log.warning("restored moved checkpoint of an interrupted merge to %s", target)
    note.unlink()


def stale_entries(directory: Path, min_age_s: float = 60.0) -> list[Path]:
    """`.tmp-` leftovers in `directory` that no live process holds (read-only: nothing is
    removed; `forest verify` reports them). Lock-less temp files count once `min_age_s` old."""
    out: list[Path] = []
    if not directory.is_dir():
        return out
    for p in sorted(directory.iterdir()):
        if not p.name.startswith(TMP_PREFIX) or p.name.endswith(".lock"):
            continue
        lock = p.with_name(p.name + ".lock")
        if lock.exists():
            fd = try_lock(lock)
            if fd is None:
                continue  # its stager is alive
            os.close(fd)
        else:
            try:
                if time.time() - p.lstat().st_mtime < min_age_s:
                    continue  # a writer of forest.json may be between its write and rename
            except FileNotFoundError:
                continue
        out.append(p)
    return out


def cleanup_stale(directory: Path) -> list[Path]:
    """Remove `.tmp-` leftovers of dead processes in `directory` (restoring moved checkpoints).

    Live stagings (their lock is held) are left alone, so this is safe while other processes
    are copying. Call it under the forest lock (forest.json temp files are only written there).
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    entries = sorted(p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX))
    for p in entries:
        if p.name.endswith(".lock"):
            continue
        lock = p.with_name(p.name + ".lock")
        fd = try_lock(lock) if lock.exists() else None
        if lock.exists() and fd is None:
            continue  # its stager is alive
        try:
            if p.is_dir():
                try:
                    restore_moved(p)
                except (ValueError, KeyError, OSError):
                    continue  # keep the data; a person has to look
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        finally:
            if fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                os.close(fd)
    for hidden in directory.glob(".staging-*"):  # killed within microseconds of creating one
        with contextlib.suppress(OSError):
            if time.time() - hidden.stat().st_mtime > 3600:
                hidden.unlink()
    for lock in entries:
        if lock.name.endswith(".lock") and not lock.with_name(lock.name[:-5]).exists():
            fd = try_lock(lock)
            if fd is not None:  # stager died after renaming its folder into place
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                os.close(fd)
                removed.append(lock)
    return removed
