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


def verify_lineage(root: Path, st) -> None:
    """Every parent an expert names exists (seed, expert or removed expert) and is from an
    earlier cycle: a hand-edited "ghost" parent in forest.json is caught here."""
    from megatron_btm.errors import ForestError
    for rec in sorted(st.experts.values(), key=lambda r: (r.cycle, r.id)):
        for pid, _ in rec.parents:
            pc = st.cycle_of(pid)
            if pc is None:
                raise ForestError(f"forest {root}: expert {rec.id!r} names parent {pid!r}, which "
                                  "is neither the seed, an expert nor a removed expert "
                                  f"(forest.json edited?); {root / 'forest.json'} is inconsistent")
            if pc >= rec.cycle:
                raise ForestError(f"forest {root}: expert {rec.id!r} (cycle {rec.cycle}) names "
                                  f"parent {pid!r} of cycle {pc}; parents come from earlier cycles")
        if not rec.parents:
            raise ForestError(f"forest {root}: expert {rec.id!r} has no parents in forest.json")


def forest_tokenizer(st) -> str | None:
    """The tokenizer sha256 the forest was created with (its seed's), None for old forests."""
    meta = st.seed.extra.get("meta") or {}
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    return tok.get("sha256") or meta.get("tokenizer_sha256")  # `forest init` keeps the seed's
    # checkpoint meta.json, which names it tokenizer_sha256


def verify_tokenizer(root: Path, st) -> None:
    """Every node's checkpoint meta.json records the forest's tokenizer (where recorded)."""
    from megatron_btm.data.identity import check_same_tokenizer, checkpoint_tokenizer
    sha = forest_tokenizer(st)
    for rec in [st.seed, *st.experts.values()]:
        ckpt = root / rec.path / CHECKPOINT_DIR
        check_same_tokenizer((f"forest {root / 'forest.json'}", sha),
                             (f"{ckpt / 'meta.json'} (node {rec.id!r})", checkpoint_tokenizer(ckpt)))


def leftovers(root: Path) -> list[Path]:
    """Staging leftovers of killed writers (not held by a live process) in the forest folder,
    its experts/ folder and (older releases staged there) its parent folder."""
    from megatron_btm.forest.staging import stale_entries
    out: list[Path] = []
    for d in (root, root / "experts"):
        out += stale_entries(d)
    if root.parent.is_dir():
        out += sorted(p for p in root.parent.glob(".merge-*") if p.is_dir())
    return out
