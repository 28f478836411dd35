"""Give a finished output tree the permissions the user's umask asks for.

`tempfile.mkdtemp`/`mkstemp` (used by utils/io.py's atomic writers) create 0700 folders and 0600
files; on a shared cluster filesystem the other jobs and users of a project must be able to read
the data, so a tree is opened up to `0o777 & ~umask` (folders) / `0o666 & ~umask` (files) just
before it is renamed into place.
"""
from __future__ import annotations

import os
from pathlib import Path


def apply_umask(root: str | os.PathLike) -> None:
    umask = os.umask(0)
    os.umask(umask)  # reading the umask requires setting it; restore at once
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
