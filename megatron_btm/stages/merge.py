"""Merge stage: register a finished run in the forest (the seed creates the forest).

The forest stores weights only: the run's final checkpoint is copied through the streaming
averager with weight 1 (bit-exact model tensors, no optimizer state), then moved into the
forest by the registry, which serialises concurrent merges with a lock and is idempotent
(merging the same run twice returns the existing record).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from megatron_btm.stages.train import STAGE_FILE, read_stage


def _weights_only_copy(run_dir: Path, stage: dict[str, Any], staging_parent: Path) -> Path:
    from megatron_btm.averaging.apply import average_checkpoints
    ckpt = run_dir / "checkpoints" / stage["checkpoint"]
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: the final checkpoint named in {run_dir}/stage.json is missing")
    out = Path(tempfile.mkdtemp(prefix=".merge-", dir=staging_parent)) / "checkpoint"
    average_checkpoints([ckpt], [1.0], out, progress=False,
                        meta_extra={"source_run": str(run_dir), "steps": stage["steps"],
                                    "tokens": stage["tokens"]})
    return out


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
    forest_root.mkdir(parents=True, exist_ok=True)
    copy = _weights_only_copy(run_dir, stage, forest_root.parent)
    try:
        return Forest.create(forest_root, seed_checkpoint=copy, copy=False,
                             seed_meta={"source_run": str(run_dir.resolve()), "steps": stage["steps"],
                                        "tokens": stage["tokens"], "device_seconds": stage["device_seconds"],
                                        "blend": stage["blend"], "config": _run_config(run_dir)},
                             domains_mix=stage["blend"])
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


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
    meta = {"kind": "checkpoint", "source": source}
    if not is_megatron_lm(ckpt):  # the forest holds the checkpoint folder itself, not its root
        return Forest.create(forest_root, seed_checkpoint=resolve_checkpoint(ckpt), copy=True,
                             seed_meta=meta)
    forest_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=forest_root.parent))
    try:
        converted = resolve_checkpoint(import_megatron_lm(ckpt, staging / "checkpoint"))
        return Forest.create(forest_root, seed_checkpoint=converted, copy=False,
                             seed_meta={**meta, "format": "megatron-lm"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    existing = {e.id: e for e in forest.experts()}.get(expert_id)
    if existing is not None and existing.extra.get("source_run") == str(run_dir.resolve()):
        return existing  # this run is already merged: idempotent
    copy = _weights_only_copy(run_dir, stage, Path(forest_root).parent)
    try:
        return forest.add_expert(
            expert_id, domain=domain, checkpoint_dir=copy, parents=parents, cycle=cycle,
            steps=stage["steps"], tokens=stage["tokens"],
            config=_run_config(run_dir), move=True,
            extra={"source_run": str(run_dir.resolve()), "device_seconds": stage["device_seconds"],
                   "final_loss": stage["final_loss"], "valid_loss": stage["valid_loss"],
                   "branch_policy": branch.get("policy")})
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


def _run_config(run_dir: Path) -> dict[str, Any]:
    from megatron_btm.utils.io import read_json
    run = read_json(run_dir / "run.json")
    return {"model": run.get("model_config"), "train": run.get("train_config")}
