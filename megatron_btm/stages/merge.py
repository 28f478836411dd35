"""Merge stage: register a finished run in the forest (the seed creates the forest).

The forest stores weights only: the run's final checkpoint is first checked against the sha256
of its files recorded in stage.json when training finished (a flipped byte is refused, never
merged), then copied through the streaming averager with weight 1 (bit-exact model tensors, no
optimizer state) into a staging folder *inside* the forest (`.tmp-merge-*`, flock-protected:
the next forest write removes it if the merge was killed), then moved in by the registry, which
serialises concurrent merges with a lock. Merging the same run again — at the same time or
later — is a no-op: the expert records the content digest of its source checkpoint, and a
second copy of the same source is recognised by it (the copy's own bytes differ: DCP writes a
fresh save id). The same run under another `--expert-id` is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_btm.errors import CheckpointError, ForestError
from megatron_btm.stages.train import STAGE_FILE, read_stage


def source_checkpoint(run_dir: Path, stage: dict[str, Any]) -> tuple[Path, str]:
    """The run's final checkpoint and its content digest, hashed before anything is copied and
    checked against stage.json's `checkpoint_files` (runs that recorded them)."""
    from megatron_btm.forest.records import checkpoint_digest
    from megatron_btm.forest.staging import hash_tree
    ckpt = run_dir / "checkpoints" / stage["checkpoint"]
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: the final checkpoint named in {run_dir}/stage.json is missing")
    files = hash_tree(ckpt)
    recorded = stage.get("checkpoint_files")
    if recorded is not None:
        bad = sorted(f for f in set(recorded) | set(files) if recorded.get(f) != files.get(f))
        if bad:
            f = bad[0]
            raise CheckpointError(
                f"{ckpt / f}: sha256 {str(files.get(f, 'missing'))[:12]}… but {run_dir}/stage.json "
                f"recorded {str(recorded.get(f, 'no such file'))[:12]}… when training finished "
                f"({len(bad)} file(s) differ): the checkpoint changed since; not merged")
    return ckpt, checkpoint_digest(files)


def _weights_only_copy(ckpt: Path, stage: dict[str, Any], run_dir: Path, staging) -> Path:
    from megatron_btm.averaging.apply import average_checkpoints
    out = staging.dir / "checkpoint"
    average_checkpoints([ckpt], [1.0], out, progress=False, created=stage.get("finished"),
                        meta_extra={"source_run": str(run_dir), "steps": stage["steps"],
                                    "tokens": stage["tokens"]})
    return out


def _staging(forest_root: Path, name: str):
    from megatron_btm.forest.staging import Staging
    forest_root.mkdir(parents=True, exist_ok=True)
    return Staging(forest_root, f"merge-{name}")


def _tokenizer(stage: dict[str, Any], ckpt: Path) -> dict[str, Any] | None:
    from megatron_btm.data.identity import checkpoint_tokenizer
    sha = stage.get("tokenizer_sha256") or checkpoint_tokenizer(ckpt)
    return {"sha256": sha, "vocab_size": stage.get("tokenizer_vocab_size")} if sha else None


def merge_seed(forest_root: str | Path, run_dir: str | Path):
    """Create the forest from a finished seed run (no-op if it already holds this seed).

    `run_dir` may also be a checkpoint instead of a run: one of ours (e.g. `btm import-hf`'s
    output) or a Megatron-LM --save folder, which is imported first (hf/megatron_lm.py).
    """
    from megatron_btm.forest import Forest
    run_dir, forest_root = Path(run_dir), Path(forest_root)
    if not (run_dir / STAGE_FILE).exists() and _is_checkpoint(run_dir):
        return _seed_from_checkpoint(forest_root, run_dir)
    stage = read_stage(run_dir)
    if stage.get("kind") != "seed":
        raise ValueError(f"{run_dir}/stage.json: kind={stage.get('kind')!r}, expected 'seed'")
    if Forest.exists(forest_root):
        forest = Forest.open(forest_root)
        if forest.seed().extra.get("meta", {}).get("source_run") == str(run_dir.resolve()):
            return forest
        raise FileExistsError(f"{forest_root}: a forest already exists with another seed")
    ckpt, digest = source_checkpoint(run_dir, stage)
    staging = _staging(forest_root, "seed")
    try:
        copy = _weights_only_copy(ckpt, stage, run_dir, staging)
        meta = {"source_run": str(run_dir.resolve()), "steps": stage["steps"],
                "tokens": stage["tokens"], "device_seconds": stage["device_seconds"],
                "blend": stage["blend"], "config": _run_config(run_dir),
                "source_checkpoint_sha256": digest}
        tok = _tokenizer(stage, ckpt)
        if tok:
            meta["tokenizer"] = tok
        return Forest.create(forest_root, seed_checkpoint=copy, copy=False, seed_meta=meta,
                             domains_mix=stage["blend"])
    finally:
        staging.discard()


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint folder, a checkpoint root (`latest`) or a Megatron-LM save folder — not a run
    folder (an unfinished run has checkpoints too, and must not be merged)."""
    from megatron_btm.hf.megatron_lm import is_megatron_lm
    if (path / "run.json").exists():
        return False
    return is_megatron_lm(path) or (path / "latest").is_file() or \
        ((path / "meta.json").is_file() and (path / "metadata.json").is_file())


def _seed_from_checkpoint(forest_root: Path, ckpt: Path):
    """The forest whose seed is the checkpoint `ckpt` (the seed meta of a plan's seed.checkpoint)."""
    from megatron_btm.forest import Forest
    from megatron_btm.hf.megatron_lm import import_megatron_lm, is_megatron_lm
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    source = str(ckpt.resolve())
    if Forest.exists(forest_root):
        if Forest.open(forest_root).seed().extra.get("meta", {}).get("source") == source:
            return Forest.open(forest_root)
        raise FileExistsError(f"{forest_root}: a forest already exists with another seed")
    from megatron_btm.data.identity import checkpoint_tokenizer
    meta = {"kind": "checkpoint", "source": source}
    if not is_megatron_lm(ckpt):  # the forest holds the checkpoint folder itself, not its root
        folder = resolve_checkpoint(ckpt)
        tok = checkpoint_tokenizer(folder)
        return Forest.create(forest_root, seed_checkpoint=folder, copy=True,
                             seed_meta={**meta, **({"tokenizer": {"sha256": tok}} if tok else {})})
    staging = _staging(forest_root, "seed")  # inside the forest: the next write cleans it
    try:
        converted = resolve_checkpoint(import_megatron_lm(ckpt, staging.dir / "checkpoint"))
        return Forest.create(forest_root, seed_checkpoint=converted, copy=False,
                             seed_meta={**meta, "format": "megatron-lm"})
    finally:
        staging.discard()


def merge_expert(forest_root: str | Path, run_dir: str | Path, *, domain: str | None = None,
                 cycle: int | None = None, expert_id: str | None = None,
                 parents: list[tuple[str, float]] | None = None):
    """Register a finished expert run. Parents and weights come from its branch record (frozen
    when the run started); a run without one (random init, a plain checkpoint) needs `parents`
    given explicitly — the forest never guesses a lineage."""
    from megatron_btm.forest import Forest
    run_dir = Path(run_dir)
    stage = read_stage(run_dir)
    if stage.get("kind") != "expert":
        raise ValueError(f"{run_dir}/stage.json: kind={stage.get('kind')!r}, expected 'expert'")
    domain = domain or stage["domain"]
    if domain != stage["domain"]:
        raise ValueError(f"--domain {domain!r} but {run_dir} trained an expert on {stage['domain']!r}")
    branch = stage.get("branch") or {}
    if parents is None:
        if not branch.get("parents"):
            raise ValueError(f"{run_dir}: the run has no branch record (it did not start from a "
                             f"`btm branch` folder), so its parents are unknown; give them "
                             f"explicitly (--parents ID:WEIGHT,...)")
        parents = [(p["id"], float(p["weight"])) for p in branch["parents"]]
    if cycle is None:
        if "cycle" not in branch:
            raise ValueError(f"{run_dir}: no cycle in its branch record; give --cycle")
        cycle = int(branch["cycle"])
    forest = Forest.open(forest_root)
    expert_id = expert_id or domain
    ckpt, digest = source_checkpoint(run_dir, stage)
    for e in forest.experts():
        same = e.extra.get("source_checkpoint_sha256") == digest or (
            e.extra.get("source_run") == str(run_dir.resolve())
            and "source_checkpoint_sha256" not in e.extra)
        if same and e.id == expert_id:
            return e  # this run is already merged: idempotent
        if same:
            raise ForestError(f"forest {forest_root}: run {run_dir} is already merged as expert "
                              f"{e.id!r}; not registering it again as {expert_id!r}")
    tok = _tokenizer(stage, ckpt)
    staging = _staging(Path(forest_root), expert_id)
    try:
        copy = _weights_only_copy(ckpt, stage, run_dir, staging)
        return forest.add_expert(
            expert_id, domain=domain, checkpoint_dir=copy, parents=parents, cycle=cycle,
            steps=stage["steps"], tokens=stage["tokens"], source_sha256=digest,
            config=_run_config(run_dir), move=True,
            extra={"source_run": str(run_dir.resolve()), "device_seconds": stage["device_seconds"],
                   "final_loss": stage["final_loss"], "valid_loss": stage["valid_loss"],
                   "branch_policy": branch.get("policy"),
                   **({"tokenizer_sha256": tok["sha256"]} if tok else {})})
    finally:
        staging.discard()


def _run_config(run_dir: Path) -> dict[str, Any]:
    from megatron_btm.utils.io import read_json
    run = read_json(run_dir / "run.json")
    return {"model": run.get("model_config"), "train": run.get("train_config")}
