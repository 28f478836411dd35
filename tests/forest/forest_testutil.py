"""Helpers for the forest tests: fake checkpoint folders (random bytes, no Megatron) and an
independent reimplementation of the checksums the registry records."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("forest_worker.py")


def make_checkpoint(path: Path, seed: int, num_files: int = 3, size: int = 2048) -> Path:
    """A folder shaped like a torch_dist checkpoint: nested files, a hidden `.metadata`."""
    rng = random.Random(seed)
    (path / "model").mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"format": "torch_dist", "step": seed}))
    (path / ".metadata").write_bytes(rng.randbytes(64))
    for i in range(num_files):
        (path / "model" / f"__{i}_0.distcp").write_bytes(rng.randbytes(size))
    return path


def files_sha256(folder: Path) -> dict[str, str]:
    """{relative path: sha256}, computed here with hashlib (not with the code under test)."""
    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            p = Path(dirpath) / f
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree_digest(folder: Path) -> str:
    lines = "".join(f"{k}\t{v}\n" for k, v in sorted(files_sha256(folder).items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_worker(*args: str, **env: str) -> subprocess.Popen:
    """Run forest_worker.py in a fresh interpreter (no fork: the real multi-process case)."""
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=worker_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
