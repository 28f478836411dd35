"""What the forest records: one `ExpertRecord` per expert (and one for the seed), snapshots, errors.

Records are frozen and JSON-round-trippable; they are the entries of forest.json and the core of
each expert's meta.json. Validation happens here, once, so a record read back from disk is as
trustworthy as one built in code.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_btm.forest.names import SEED_ID, check_name

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file's bytes differ from the sha256 recorded when the expert was merged."""


class ForestLockTimeout(TimeoutError):
    """The forest lock could not be taken in time (another merge holds it, or a stale mount)."""


def checkpoint_digest(files: Mapping[str, str]) -> str:
    """One sha256 for a checkpoint folder: over the sorted `relative path<TAB>file sha256` lines.

    Hashing the per-file digests (not the concatenated bytes) lets verification name the file
    that changed, and makes the digest independent of file order on disk.
    """
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{files[rel]}\n".encode())
    return h.hexdigest()


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return value


def check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name}={value!r}: must be a finite number >= 0")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class ExpertRecord:
    """One node of the forest (an expert, or the seed with id 'seed', domain 'seed', cycle 0)."""

    id: str
    domain: str
    cycle: int
    """BTM cycle that trained it: 0 is the seed, first-cycle experts are 1."""
    parents: tuple[tuple[str, float], ...] = ()
    """(parent id, weight) pairs: θ was initialised as Σ weight·θ_parent before training."""
    steps: int = 0
    tokens: int = 0
    created: str = ""
    path: str = ""
    """Folder of the node relative to the forest root (`experts/<id>` or `seed`)."""
    checkpoint_sha256: str = ""
    """`checkpoint_digest` of the files of `<path>/checkpoint/`."""
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.id, "expert id")
        check_name(self.domain, "domain")
        _check_int(f"expert {self.id}: cycle", self.cycle)
        _check_int(f"expert {self.id}: steps", self.steps)
        _check_int(f"expert {self.id}: tokens", self.tokens)
        parents = []
        for i, p in enumerate(self.parents):
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ValueError(f"expert {self.id}: parents[{i}]={p!r}: "
                                 "must be (parent id, weight)")
            parents.append((check_name(p[0], f"expert {self.id}: parent id"),
                            check_weight(f"expert {self.id}: weight of parent {p[0]}", p[1])))
        ids = [p for p, _ in parents]
        if len(set(ids)) != len(ids):
            raise ValueError(f"expert {self.id}: parents {ids} name the same parent twice")
        if self.id in ids:
            raise ValueError(f"expert {self.id}: cannot be its own parent")
        object.__setattr__(self, "parents", tuple(parents))
        if not _SHA256_RE.fullmatch(self.checkpoint_sha256):
            raise ValueError(f"expert {self.id}: checkpoint_sha256={self.checkpoint_sha256!r}: "
                             "must be 64 lowercase hex digits")
        for name in ("config", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"expert {self.id}: {name} must be a dict, "
                                 f"got {type(getattr(self, name)).__name__}")

    def __hash__(self) -> int:  # config/extra are dicts; id + digest identify a record
        return hash((self.id, self.checkpoint_sha256))

    @property
    def is_seed(self) -> bool:
        return self.id == SEED_ID

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parents"] = [{"id": p, "weight": w} for p, w in self.parents]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "record") -> ExpertRecord:
        """Build from `to_dict` output; errors name `source` (e.g. the forest.json path) and key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected an object, got {type(d).__name__}")
        required = ("id", "domain", "cycle", "parents", "checkpoint_sha256")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing key(s) {missing}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")
        try:
            parents = tuple((p["id"], p["weight"]) for p in d["parents"])
        except (TypeError, KeyError):
            raise ValueError(f"{source}: parents={d['parents']!r}: must be a list of "
                             '{"id": ..., "weight": ...}') from None
        try:
            return cls(**{**d, "parents": parents})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class ForestSnapshot:
    """The forest as it was at one moment (e.g. the start of a cycle): branching for cycle c
    must not see experts that cycle-c jobs merged while others were still branching."""

    root: str
    taken: str
    seed: ExpertRecord
    experts: tuple[ExpertRecord, ...]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.experts]

    def get(self, expert_id: str) -> ExpertRecord:
        for r in self.experts:
            if r.id == expert_id:
                return r
        raise ValueError(f"snapshot of forest {self.root}: unknown expert {expert_id!r}; "
                         f"known: {self.ids}")

    def by_domain(self, domain: str) -> list[ExpertRecord]:
        return [r for r in self.experts if r.domain == domain]

    def domains(self) -> list[str]:
        return sorted({r.domain for r in self.experts})

    def __len__(self) -> int:
        return len(self.experts)

    def __iter__(self) -> Iterator[ExpertRecord]:
        return iter(self.experts)

    def __contains__(self, expert_id: object) -> bool:
        return any(r.id == expert_id for r in self.experts)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "taken": self.taken, "seed": self.seed.to_dict(),
                "experts": [r.to_dict() for r in self.experts]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "snapshot") -> ForestSnapshot:
        try:
            return cls(root=d["root"], taken=d["taken"],
                       seed=ExpertRecord.from_dict(d["seed"], source=f"{source}: seed"),
                       experts=tuple(ExpertRecord.from_dict(r, source=f"{source}: experts[{i}]")
                                     for i, r in enumerate(d["experts"])))
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
