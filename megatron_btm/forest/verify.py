"""Checking a forest node's checkpoint against the sha256 recorded when it was merged.

Every failure names the expert and the file, so a user can tell a half-synced copy (missing
file) from bit rot or an overwritten checkpoint (changed bytes) without reading code.
"""
from __future__ import annotations

from pathlib import Path

from megatron_btm.forest.records import CorruptCheckpointError, ExpertRecord, checkpoint_digest
from megatron_btm.forest.staging import CHECKPOINT_DIR, hash_tree
from megatron_btm.utils.io import read_json


class UnknownExpertError(ValueError, KeyError):
    """An expert id the forest does not hold (a ValueError for the CLI, a KeyError for lookups)."""

    __str__ = ValueError.__str__  # KeyError would print the message in quotes


def verify_node(root: Path, rec: ExpertRecord) -> None:
    """Raise FileNotFoundError / CorruptCheckpointError unless `rec`'s checkpoint is intact."""
    who = f"forest {root}: expert {rec.id!r}" if not rec.is_seed else f"forest {root}: the seed"
    folder = root / rec.path
    meta_path = folder / "meta.json"
    ckpt = folder / CHECKPOINT_DIR
    if not meta_path.is_file():
        raise FileNotFoundError(f"{who}: {meta_path} is missing")
    meta = read_json(meta_path)
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CorruptCheckpointError(f"{who}: {meta_path} has no valid \"files\" table")
    if checkpoint_digest(files) != rec.checkpoint_sha256:
        raise CorruptCheckpointError(f"{who}: {meta_path} lists files whose digest does not match "
                                     "forest.json (meta.json was edited or replaced)")
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{who}: checkpoint folder {ckpt} is missing")
    actual = hash_tree(ckpt)
    missing = sorted(set(files) - set(actual))
    if missing:
        raise FileNotFoundError(f"{who}: checkpoint file {ckpt / missing[0]} is missing"
                                + (f" (and {len(missing) - 1} more: {missing[1:6]})"
                                   if len(missing) > 1 else ""))
    changed = sorted(f for f in files if actual[f] != files[f])
    if changed:
        first = changed[0]
        raise CorruptCheckpointError(
            f"{who}: checkpoint file {ckpt / first} is corrupt (sha256 {actual[first][:12]}…, "
            f"recorded {files[first][:12]}…)"
            + (f"; also changed: {changed[1:6]}" if len(changed) > 1 else ""))
    extra = sorted(set(actual) - set(files))
    if extra:
        raise CorruptCheckpointError(f"{who}: unexpected file {ckpt / extra[0]} in the checkpoint "
                                     f"(not recorded at merge time; {len(extra)} in all)")
