"""forest.json: its schema, parsing, and the small helpers every forest write shares."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from megatron_btm.forest import names
from megatron_btm.forest.records import ExpertRecord
from megatron_btm.forest.staging import MOVE_NOTE
from megatron_btm.utils.io import TMP_PREFIX, atomic_write_json

FOREST_FILE = "forest.json"
EXPERTS_DIR = "experts"
SEED_DIR = "seed"
META_FILE = "meta.json"
FORMAT, VERSION = "btm-forest", 1


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def pause_for_test(phase: str) -> None:
    """Test-only hook: with BTM_FOREST_TEST_PAUSE_AT=<phase>, announce the phase (by writing
    it to BTM_FOREST_TEST_PAUSE_SIGNAL) and sleep, so a test can SIGKILL us exactly here."""
    if os.environ.get("BTM_FOREST_TEST_PAUSE_AT") == phase:
        signal_file = os.environ.get("BTM_FOREST_TEST_PAUSE_SIGNAL")
        if signal_file:
            Path(signal_file).write_text(phase)
        time.sleep(3600)


def check_json(what: str, value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: not JSON-serialisable ({e})") from None
    return value


def checkpoint_format(ckpt: Path) -> str:
    """The `format` of a project checkpoint (its meta.json), else 'opaque' (any folder works)."""
    try:
        fmt = json.loads((ckpt / META_FILE).read_text()).get("format")
        return fmt if isinstance(fmt, str) else "opaque"
    except (OSError, ValueError, AttributeError):
        return "opaque"


@dataclass
class State:
    """forest.json, parsed and validated."""
    doc: dict
    seed: ExpertRecord
    experts: dict[str, ExpertRecord]
    removed: list[dict] = field(default_factory=list)

    def parents_map(self) -> dict[str, tuple[tuple[str, float], ...]]:
        pm = {names.SEED_ID: ()}
        for r in self.removed:
            pm[r["id"]] = tuple((p["id"], p["weight"]) for p in r["parents"])
        pm.update({i: r.parents for i, r in self.experts.items()})
        return pm

    def cycle_of(self, node: str) -> int | None:
        if node == names.SEED_ID:
            return 0
        if node in self.experts:
            return self.experts[node].cycle
        return next((r["cycle"] for r in self.removed if r["id"] == node), None)


def parse(doc: Any, path: Path) -> State:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a forest manifest (expected \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: version {doc.get('version')!r} is not supported "
                         f"(this code reads version {VERSION})")
    for key, typ in (("seed", dict), ("experts", dict), ("removed", list)):
        if not isinstance(doc.get(key), typ):
            raise ValueError(f"{path}: key {key!r} missing or not a {typ.__name__}")
    seed = ExpertRecord.from_dict(doc["seed"], source=f"{path}: seed")
    if seed.id != names.SEED_ID or seed.cycle != 0:
        raise ValueError(f"{path}: seed record must have id {names.SEED_ID!r} and cycle 0")
    for i, r in enumerate(doc["removed"]):
        try:
            names.check_name(r["id"], "expert id")
            ok = isinstance(r["cycle"], int) and all(
                isinstance(p["id"], str) and isinstance(p["weight"], (int, float))
                for p in r["parents"])
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: removed[{i}] must have id, cycle and parents "
                             '[{"id": ..., "weight": ...}]')
    experts = {}
    for eid, rec in doc["experts"].items():
        r = ExpertRecord.from_dict(rec, source=f"{path}: experts.{eid}")
        if r.id != eid:
            raise ValueError(f"{path}: experts.{eid} has id {r.id!r}")
        experts[eid] = r
    return State(doc=doc, seed=seed, experts=experts, removed=doc["removed"])


def check_source(path: str | os.PathLike, root: Path) -> Path:
    src = Path(path)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder {src}: not found (or not a directory)")
    if not any(p.is_file() for p in src.rglob("*")):
        raise ValueError(f"checkpoint folder {src}: contains no files")
    r, s = root.resolve(), src.resolve()
    staged = r in s.parents and s.relative_to(r).parts[0].startswith(TMP_PREFIX)  # a merge's
    if (s == r or r in s.parents) and not staged:
        raise ValueError(f"checkpoint folder {src}: is inside the forest {root}; "
                         "register checkpoints from outside it")
    return src


def write_meta(folder: Path, rec: ExpertRecord, files: Mapping[str, str]) -> None:
    """The node's human-readable meta.json: its record, checkpoint format, and every file's
    sha256 (what `verify` checks)."""
    atomic_write_json(folder / META_FILE, {
        "format": "btm-forest-node", **rec.to_dict(),
        "checkpoint_format": checkpoint_format(folder / "checkpoint"), "files": dict(files)})


def seed_record(seed_meta: Mapping[str, Any], domains_mix: Mapping[str, float],
                digest: str) -> ExpertRecord:
    """The seed's record; steps/tokens/config come from `seed_meta` (a checkpoint meta.json's
    `step` and `model_config` are understood too), the whole of it is kept in extra["meta"]."""
    def count(*keys: str) -> int:
        value = next((seed_meta[k] for k in keys if seed_meta.get(k) is not None), 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"seed_meta[{keys[0]!r}]={value!r}: must be an integer >= 0")
        return value

    config = next((seed_meta[k] for k in ("config", "model_config") if k in seed_meta), None)
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"seed_meta['config']={config!r}: must be an object")
    return ExpertRecord(id=names.SEED_ID, domain=names.SEED_ID, cycle=0, parents=(),
                        steps=count("steps", "step"), tokens=count("tokens"), created=now(),
                        path=SEED_DIR, checkpoint_sha256=digest, config=dict(config or {}),
                        extra={"domains_mix": dict(domains_mix), "meta": dict(seed_meta)})


def clear_move_note(folder: Path) -> None:
    if (folder / MOVE_NOTE).exists():
        (folder / MOVE_NOTE).unlink()
