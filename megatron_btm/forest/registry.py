"""The forest registry: `forest.json` + one folder per expert, safe under concurrent merges.

Layout (docs/CONTRACTS.md):
    <root>/forest.json                 the manifest: seed, experts {id: record}, removed history
    <root>/.lock                       flock target serialising every write (see lock.py)
    <root>/seed/{meta.json,checkpoint/}
    <root>/experts/<id>/{meta.json,checkpoint/}

Commit protocol of `add_expert`: stage the checkpoint under `experts/.tmp-<id>.*` outside the
lock; under the lock re-read forest.json, check the id, rename the staged folder into place,
then atomically replace forest.json (the commit point). A SIGKILL anywhere leaves either the old
forest plus leftovers that no reader treats as entries (`.tmp-` folders, or a folder not listed
in forest.json) which the next write cleans, or the new forest. Readers never take the lock:
forest.json is only ever replaced whole by a rename.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from megatron_btm.data.identity import check_same_tokenizer
from megatron_btm.errors import ForestError
from megatron_btm.forest import lineage as _lineage
from megatron_btm.forest import manifest, names, verify as _verify
from megatron_btm.forest.lock import ForestLock
from megatron_btm.forest.manifest import EXPERTS_DIR, FOREST_FILE, FORMAT, SEED_DIR, VERSION, State
from megatron_btm.forest.records import (
    ExpertRecord,
    ForestSnapshot,
    check_weight,
    checkpoint_digest,
)
from megatron_btm.forest.staging import MOVE_NOTE, Staging, cleanup_stale, hash_tree, restore_moved
from megatron_btm.forest.verify import UnknownExpertError, verify_node
from megatron_btm.utils.io import TMP_PREFIX, atomic_write_json, fsync_dir, read_json

log = logging.getLogger(__name__)

class Forest:
    """An ELMForest on disk. Cheap to construct; every query reads the current forest.json."""

    def __init__(self, root: str | os.PathLike, *, lock_timeout_s: float | None = None) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s

    # ---- opening ---------------------------------------------------------------------------
    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        return (Path(root) / FOREST_FILE).is_file()

    @classmethod
    def open(cls, root: str | os.PathLike, **kw: Any) -> Forest:
        forest = cls(root, **kw)
        if not cls.exists(root):
            raise FileNotFoundError(f"{forest.root / FOREST_FILE}: no forest here "
                                    "(create one with `btm forest init`)")
        forest._state()  # fail now, with the file named, if forest.json is corrupt
        return forest

    @classmethod
    def create(cls, root: str | os.PathLike, *, seed_checkpoint: str | os.PathLike,
               seed_meta: Mapping[str, Any], domains_mix: Mapping[str, float] | None = None,
               copy: bool = True, lock_timeout_s: float | None = None) -> Forest:
        """A new forest whose seed LM is `seed_checkpoint` (copied, or moved with copy=False)."""
        forest = cls(root, lock_timeout_s=lock_timeout_s)
        src = manifest.check_source(seed_checkpoint, forest.root)
        if not isinstance(seed_meta, Mapping):
            raise ValueError(f"seed_meta: must be a dict, got {type(seed_meta).__name__}")
        seed_meta = dict(manifest.check_json("seed_meta", seed_meta))
        mix = {names.check_name(d, "domains_mix domain"): check_weight(f"domains_mix[{d}]", w)
               for d, w in (domains_mix or {}).items()}
        forest.root.mkdir(parents=True, exist_ok=True)
        with ForestLock(forest.root, forest.lock_timeout_s):
            if cls.exists(forest.root):
                raise FileExistsError(f"{forest.root / FOREST_FILE}: a forest already exists")
            # Only leftovers of an interrupted create may be here; anything else is not ours.
            ours = {".lock", SEED_DIR, EXPERTS_DIR}
            other = sorted(p.name for p in forest.root.iterdir() if p.name not in ours
                           and not p.name.startswith((TMP_PREFIX, ".staging-")))
            if other or any((forest.root / EXPERTS_DIR).glob("[!.]*")):
                raise FileExistsError(f"{forest.root}: not empty and not a forest (contains "
                                      f"{other[:5] or 'experts'}); choose an empty folder")
            cleanup_stale(forest.root)
            if (forest.root / SEED_DIR).exists():  # an interrupted create: start over
                restore_moved(forest.root / SEED_DIR)
                shutil.rmtree(forest.root / SEED_DIR)
            staging = Staging(forest.root, SEED_DIR)
            try:
                files = staging.fill(src, move=not copy)
                seed = manifest.seed_record(seed_meta, mix, checkpoint_digest(files))
                manifest.write_meta(staging.dir, seed, files)
                os.rename(staging.dir, forest.root / SEED_DIR)
            except BaseException:
                staging.discard()
                raise
            (forest.root / EXPERTS_DIR).mkdir(exist_ok=True)
            fsync_dir(forest.root)
            manifest.pause_for_test("create_renamed")
            atomic_write_json(forest.root / FOREST_FILE, {
                "format": FORMAT, "version": VERSION, "created": seed.created,
                "updated": seed.created, "seed": seed.to_dict(), "experts": {}, "removed": []})
            manifest.clear_move_note(forest.root / SEED_DIR)
            staging.close()
            if staging.copied_from_move is not None:
                shutil.rmtree(staging.copied_from_move)
        return forest

    # ---- reading ---------------------------------------------------------------------------
    def _state(self) -> State:
        # Always re-read: forest.json is small, and a stat-keyed cache could be fooled by inode
        # reuse within one mtime tick while 16 merges replace the file.
        path = self.root / FOREST_FILE
        return manifest.parse(read_json(path), path)

    def experts(self) -> list[ExpertRecord]:
        """The forest's experts (the seed is not one), ordered by cycle then id."""
        return sorted(self._state().experts.values(), key=lambda r: (r.cycle, r.id))

    def require_experts(self) -> list[ExpertRecord]:
        """`experts()`, refusing an empty forest (ensembles and averages need at least one)."""
        out = self.experts()
        if not out:
            raise ValueError(f"forest {self.root} has no experts (only the seed); "
                             "train and merge at least one expert first")
        return out

    def seed(self) -> ExpertRecord:
        return self._state().seed

    def get(self, expert_id: str) -> ExpertRecord:
        """The record of `expert_id` ('seed' gives the seed's record)."""
        st = self._state()
        names.check_name(expert_id, "expert id")
        if expert_id == names.SEED_ID:
            return st.seed
        if expert_id not in st.experts:
            raise self._unknown(expert_id, st)
        return st.experts[expert_id]

    def _unknown(self, expert_id: str, st: State) -> UnknownExpertError:
        gone = [r for r in st.removed if r["id"] == expert_id]
        why = f" (it was removed at {gone[-1]['removed']})" if gone else ""
        return UnknownExpertError(f"forest {self.root}: unknown expert {expert_id!r}{why}; "
                                  f"known experts: {sorted(st.experts) or 'none'}")

    def by_domain(self, domain: str) -> list[ExpertRecord]:
        names.check_name(domain, "domain")
        return [r for r in self.experts() if r.domain == domain]

    def domains(self) -> list[str]:
        return sorted({r.domain for r in self._state().experts.values()})

    def removed(self) -> list[dict]:
        """History of removed experts: id, domain, cycle, parents, removed (time), descendants."""
        return list(self._state().removed)

    def lineage(self, expert_id: str) -> list[tuple[str, float, int]]:
        """(ancestor id, weight, depth) back to the seed; see `lineage.lineage`."""
        names.check_name(expert_id, "expert id")
        pm = self._state().parents_map()
        if expert_id not in pm:
            raise self._unknown(expert_id, self._state())
        return _lineage.lineage(pm, expert_id)

    def descendants(self, expert_id: str) -> list[str]:
        """Current experts descending from `expert_id` (seed, expert or removed expert)."""
        names.check_name(expert_id, "expert id")
        st = self._state()
        pm = st.parents_map()
        if expert_id not in pm:
            raise self._unknown(expert_id, st)
        desc = _lineage.descendants(pm, expert_id) & set(st.experts)
        return sorted(desc, key=lambda i: (st.experts[i].cycle, i))

    def snapshot(self, *, before_cycle: int | None = None) -> ForestSnapshot:
        """The experts now (or only those of cycles < before_cycle: the forest at that cycle's
        start, whatever later cycles merged since)."""
        st = self._state()
        exps = sorted(st.experts.values(), key=lambda r: (r.cycle, r.id))
        if before_cycle is not None:
            exps = [r for r in exps if r.cycle < before_cycle]
        return ForestSnapshot(root=str(self.root), taken=manifest.now(), seed=st.seed,
                              experts=tuple(exps))

    def verify(self, expert_id: str | None = None) -> list[str]:
        """Check checkpoint files against their recorded sha256 (all nodes, seed included, when
        expert_id is None); return the ids checked. Raises CorruptCheckpointError or
        FileNotFoundError naming the expert and the file."""
        recs = [self.get(expert_id)] if expert_id is not None else [self.seed(), *self.experts()]
        if expert_id is None:  # the whole forest: lineage, tokenizer, leftovers too
            st = self._state()
            _verify.verify_lineage(self.root, st)
            _verify.verify_tokenizer(self.root, st)
        for r in recs:
            verify_node(self.root, r)
        return [r.id for r in recs]

    def leftovers(self) -> list[Path]:
        """Staging of killed writers no live process holds (`btm forest verify` reports them;
        the next write, or `recover`, removes those inside the forest)."""
        return _verify.leftovers(self.root)

    def tokenizer(self) -> dict | None:
        """{"sha256", "vocab_size"} of the forest's tokenizer (None: not recorded)."""
        sha = _verify.forest_tokenizer(st := self._state())
        tok = (st.seed.extra.get("meta") or {}).get("tokenizer")
        return (dict(tok) if isinstance(tok, dict) else {"sha256": sha}) if sha else None

    def checkpoint_path(self, expert_id: str, *, verify: bool = True) -> Path:
        rec = self.get(expert_id)
        if verify:
            verify_node(self.root, rec)
        return self.root / rec.path / "checkpoint"

    def seed_checkpoint_path(self, *, verify: bool = True) -> Path:
        return self.checkpoint_path(names.SEED_ID, verify=verify)

    # ---- writing ---------------------------------------------------------------------------
    def _locked_state(self) -> State:
        """Under the lock: clean leftovers of killed writers, then the current manifest."""
        st = self._state()
        experts_dir = self.root / EXPERTS_DIR
        experts_dir.mkdir(exist_ok=True)
        cleanup_stale(experts_dir)  # first: moved-in copies go back to a merge's staging
        for p in experts_dir.iterdir():
            if p.name.startswith((TMP_PREFIX, ".staging-")) or not p.is_dir():
                continue
            if p.name not in st.experts:  # renamed into place, killed before the commit
                restore_moved(p)
                shutil.rmtree(p)
            elif (p / MOVE_NOTE).exists():  # committed, killed before tidying
                (p / MOVE_NOTE).unlink()
        cleanup_stale(self.root)  # then the merges' own staging (.tmp-merge-*)
        return st

    def recover(self) -> None:
        """Clean up after killed writers now (every write does this anyway): remove `.tmp-`
        leftovers and unlisted folders, and move checkpoints that were being moved in back to
        where they came from."""
        with ForestLock(self.root, self.lock_timeout_s):
            self._locked_state()

    def _write(self, st: State, experts: dict[str, ExpertRecord], removed: list[dict]) -> None:
        doc = {**st.doc, "updated": manifest.now(),
               "experts": {i: r.to_dict() for i, r in experts.items()}, "removed": removed}
        atomic_write_json(self.root / FOREST_FILE, doc)

    def add_expert(self, expert_id: str, *, domain: str, checkpoint_dir: str | os.PathLike,
                   parents: Iterable[tuple[str, float]], cycle: int, steps: int, tokens: int,
                   config: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                   move: bool = False, source_sha256: str | None = None) -> ExpertRecord:
        """Register a trained expert (the BTM merge step); idempotent for the same checkpoint.

        `source_sha256`: the content digest of what the checkpoint was made from (the merge
        stage's run checkpoint), recorded as extra["source_checkpoint_sha256"]: registering the
        same source again under the same id is a no-op even when the copy's bytes differ, under
        another id it is refused. extra["tokenizer_sha256"] must be the forest's tokenizer."""
        names.check_expert_id(expert_id)
        names.check_domain(domain)
        if not Path(checkpoint_dir).exists():
            self.recover()  # a merge killed after moving it in (move=True) puts it back
        try:
            src = manifest.check_source(checkpoint_dir, self.root)
        except FileNotFoundError as e:
            if expert_id in self._state().experts:
                raise FileNotFoundError(f"{e}; note: expert {expert_id!r} is already registered "
                                        "(a previous merge with move=True moved it in)") from None
            raise
        parents = tuple((p, w) for p, w in parents)
        if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 1:
            raise ValueError(f"expert {expert_id}: cycle={cycle!r}: must be an integer >= 1 "
                             "(cycle 0 is the seed)")
        if not parents:
            raise ValueError(f"expert {expert_id}: parents is empty; name at least one parent "
                             "(the seed is 'seed')")
        probe = ExpertRecord(  # validates names, weights, counts before any copying
            id=expert_id, domain=domain, cycle=cycle, parents=parents, steps=steps, tokens=tokens,
            created=manifest.now(), path=f"{EXPERTS_DIR}/{expert_id}", checkpoint_sha256="0" * 64,
            config=dict(manifest.check_json("config", dict(config))),
            extra=dict(manifest.check_json("extra", dict(
                extra or {}, **({"source_checkpoint_sha256": source_sha256}
                                if source_sha256 else {})))))
        st = self._state()
        self._check_new(probe, st)
        if expert_id in st.experts:  # cheap rerun: hash in place, copy nothing
            return self._same_or_duplicate(st.experts[expert_id], probe, src)
        staging = Staging(self.root / EXPERTS_DIR, expert_id)
        try:
            files = staging.fill(src, move=move)
            rec = dataclasses.replace(probe, checkpoint_sha256=checkpoint_digest(files))
            manifest.write_meta(staging.dir, rec, files)
            manifest.pause_for_test("staged")
            with ForestLock(self.root, self.lock_timeout_s):
                st = self._locked_state()
                self._check_new(rec, st)
                if expert_id in st.experts:  # a concurrent merge of the same id won the race
                    staging.discard()
                    return self._same_or_duplicate(st.experts[expert_id], rec, src)
                manifest.pause_for_test("locked")
                final = self.root / EXPERTS_DIR / expert_id
                os.rename(staging.dir, final)
                try:
                    fsync_dir(final.parent)
                    manifest.pause_for_test("renamed")
                    self._write(st, {**st.experts, expert_id: rec}, st.removed)  # commit point
                except BaseException:  # not committed: take the folder out again
                    restore_moved(final)
                    shutil.rmtree(final, ignore_errors=True)
                    raise
                manifest.pause_for_test("committed")
                manifest.clear_move_note(final)
        except BaseException:
            if staging.dir.exists():
                staging.discard()
            raise
        finally:
            staging.close()
        if staging.copied_from_move is not None:
            shutil.rmtree(staging.copied_from_move)
        return rec

    def _check_new(self, rec: ExpertRecord, st: State) -> None:
        check_same_tokenizer((f"forest {self.root / FOREST_FILE}", _verify.forest_tokenizer(st)),
                             (f"expert {rec.id!r}", rec.extra.get("tokenizer_sha256")))
        source = rec.extra.get("source_checkpoint_sha256")
        twin = next((r for r in st.experts.values() if r.id != rec.id and source
                     and r.extra.get("source_checkpoint_sha256") == source), None)
        if twin is not None:
            raise ForestError(f"forest {self.root}: expert {rec.id!r}: its checkpoint "
                              f"(source sha256 {source[:12]}…) is already registered as expert "
                              f"{twin.id!r}; one run is one expert")
        gone = [r for r in st.removed if r["id"] == rec.id]
        if gone:
            raise ValueError(f"forest {self.root}: expert id {rec.id!r} was removed at "
                             f"{gone[-1]['removed']}; ids are never reused, choose another")
        for pid, _ in rec.parents:
            pc = st.cycle_of(pid)
            if pc is None:
                raise UnknownExpertError(
                    f"expert {rec.id}: unknown parent {pid!r}; known: "
                    f"{[names.SEED_ID, *sorted(st.experts)]} (or a removed expert)")
            if pc >= rec.cycle:
                raise ValueError(f"expert {rec.id} (cycle {rec.cycle}): parent {pid!r} is from "
                                 f"cycle {pc}; parents must come from earlier cycles")

    def _same_or_duplicate(self, existing: ExpertRecord, rec: ExpertRecord,
                           src: Path) -> ExpertRecord:
        source = rec.extra.get("source_checkpoint_sha256")
        if source and existing.extra.get("source_checkpoint_sha256") == source:
            log.warning("forest %s: expert %r is already registered from the same source "
                        "checkpoint (%s); nothing to do", self.root, existing.id, src)
            return existing
        files = hash_tree(src) if rec.checkpoint_sha256 == "0" * 64 else None
        digest = checkpoint_digest(files) if files is not None else rec.checkpoint_sha256
        if digest == existing.checkpoint_sha256:
            log.warning("forest %s: expert %r is already registered with an identical checkpoint "
                        "(%s); nothing to do", self.root, existing.id, src)
            return existing
        raise ValueError(f"forest {self.root}: duplicate expert id {existing.id!r}: already "
                         f"registered with a different checkpoint (sha256 "
                         f"{existing.checkpoint_sha256[:12]}…, new {src} has "
                         f"{digest[:12]}…); choose another id")

    def remove(self, expert_id: str) -> list[str]:
        """Remove an expert (and its domain, if it was the only one); return the experts that
        descend from it, warning about them: removal is then not complete unlearning."""
        names.check_name(expert_id, "expert id")
        if expert_id == names.SEED_ID:
            raise ValueError(f"forest {self.root}: the seed cannot be removed")
        with ForestLock(self.root, self.lock_timeout_s):
            st = self._locked_state()
            if expert_id not in st.experts:
                raise self._unknown(expert_id, st)
            rec = st.experts[expert_id]
            desc = _lineage.descendants(st.parents_map(), expert_id) & set(st.experts)
            desc_sorted = sorted(desc, key=lambda i: (st.experts[i].cycle, i))
            entry = {"id": rec.id, "domain": rec.domain, "cycle": rec.cycle,
                     "parents": rec.to_dict()["parents"], "removed": manifest.now(),
                     "checkpoint_sha256": rec.checkpoint_sha256, "descendants": desc_sorted}
            experts = {i: r for i, r in st.experts.items() if i != expert_id}
            self._write(st, experts, [*st.removed, entry])  # the commit point
            manifest.pause_for_test("remove_committed")
            trash = self.root / EXPERTS_DIR / f"{TMP_PREFIX}removed-{expert_id}.{uuid.uuid4().hex}"
            os.rename(self.root / rec.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        if desc_sorted:
            warnings.warn(f"forest {self.root}: removed expert {expert_id!r}, but experts "
                          f"{desc_sorted} descend from it (initialised from its parameters), so "
                          "its data still influences them: removal is not complete unlearning",
                          stacklevel=2)
        return desc_sorted


