"""Checkpoints through Megatron's dist_checkpointing (torch_dist): save, resume, load weights.

Layout (docs/CONTRACTS.md): `<root>/iter_XXXXXXX/` holds the torch_dist files and meta.json;
`<root>/latest` names the newest complete one. A checkpoint is written under a `.tmp-` name and
renamed into place by rank 0 after every rank has finished, then `latest` is rewritten
atomically: a crash at any moment leaves the previous checkpoint as the latest complete one.

Model tensors use Megatron's global keys, so a checkpoint saved at one TP/PP loads at another
(dist_checkpointing reshards). Optimizer state and RNG states are restored only when the
parallel layout matches (resuming a run); weights alone load anywhere (`load_weights`).
"""
from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_btm.utils.io import TMP_PREFIX, atomic_write_json, atomic_write_text, fsync_dir, read_json
from megatron_btm.utils.proc import install_checkpoint_results_queue

FORMAT = "torch_dist"
EXTRA_STATE = "_extra_state"  # Transformer Engine's per-module state entries
# dp_reshardable is the one distributed-optimizer format that round-trips on 0.16.x
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None (no `latest` file yet)."""
    root = Path(root)
    marker = root / "latest"
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{marker} names {path.name}, which is missing or incomplete")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint folder, a `checkpoints/` root or a run folder; return the checkpoint."""
    path = Path(path)
    if (path / "meta.json").exists() and (path / "metadata.json").exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").exists():
            return latest_checkpoint(root)
    raise FileNotFoundError(f"{path}: no checkpoint here (expected meta.json + torch_dist files, "
                            f"or a folder with a 'latest' file)")


def read_meta(ckpt: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(ckpt) / "meta.json")


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _model_sharded_state_dict(model_chunks) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(model_chunks)}


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _rng_sharded_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    layout = _layout()
    state = {"torch": torch.get_rng_state(),
             "tracker": _tracker_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def _tracker_states():
    from megatron.core import tensor_parallel
    return tensor_parallel.get_cuda_rng_tracker().get_states()


def _restore_rng(state):
    from megatron.core import tensor_parallel
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str | os.PathLike, *, step: int, model_chunks, optimizer=None,
                    scheduler=None, state: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None, keep: int | None = None) -> Path:
    """Save a (resumable) checkpoint collectively on all ranks; return its final path.

    `state` is run state common to all ranks (step, tokens, consumed samples, ...); `meta` goes
    to meta.json (model_config etc.). Without an optimizer the checkpoint is weights-only.
    """
    from megatron.core import dist_checkpointing
    root = Path(root)
    rank = torch.distributed.get_rank()
    final = root / iter_name(step)
    tmp = root / f"{TMP_PREFIX}{iter_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()

    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=OPTIMIZER_METADATA)
        sharded["rng_state"] = _rng_sharded_object()
    if scheduler is not None:
        sharded["scheduler"] = scheduler.state_dict()
    sharded["run_state"] = dict(state or {}, step=step)
    install_checkpoint_results_queue()   # Megatron's writer Manager dies with this process
    dist_checkpointing.save(sharded, str(tmp))  # default strategy: torch_dist
    torch.distributed.barrier()

    if rank == 0:
        full_meta = dict(meta or {})
        full_meta.update(format=FORMAT, step=step, parallel=_layout(),
                         weights_only=optimizer is None,
                         created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        full_meta.update({k: v for k, v in (state or {}).items() if isinstance(v, (int, float, str))})
        atomic_write_json(tmp / "meta.json", full_meta)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
        if keep:
            _prune(root, keep)
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.name.startswith("iter_") and (p / "meta.json").exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: str | os.PathLike, *, model_chunks, optimizer=None, scheduler=None) -> dict:
    """Resume: load model (+ optimizer, scheduler, RNG when the layout matches). Returns run_state."""
    from megatron.core import dist_checkpointing
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    same_layout = meta.get("parallel") == _layout()
    sharded = _model_sharded_state_dict(model_chunks)
    want_optimizer = optimizer is not None and not meta.get("weights_only", False)
    if want_optimizer:
        if not same_layout:
            raise ValueError(f"{ckpt}: saved with parallel layout {meta.get('parallel')} but this run "
                             f"uses {_layout()}; resuming optimizer state needs the same layout "
                             f"(use init_from to start a new run from its weights)")
        _prepare_distributed_optimizer(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                            metadata=OPTIMIZER_METADATA)
        sharded["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    _load_model_parts(model_chunks, loaded)
    if want_optimizer:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_distributed_optimizer_steps(optimizer, loaded["optimizer"])
        _restore_rng(loaded["rng_state"])
        if scheduler is not None and "scheduler" in loaded:
            scheduler.load_state_dict(loaded["scheduler"])
    return dict(loaded.get("run_state", {}), meta=meta)


def load_weights(model_chunks, ckpt: str | os.PathLike) -> dict:
    """Load only model weights (any saved TP/PP into the current one). Returns meta.json.

    Checkpoints also cross layer specs: the local spec saves under the TE spec's tensor names,
    and Transformer Engine modules add `*._extra_state` objects (FP8 metadata). A TE
    checkpoint loaded into a local model leaves those unread; a local checkpoint loaded into a
    TE model keeps each module's own extra state (megatron-core 0.16 reads the missing objects
    as None, which TE ignores; this does not depend on that). Any other tensor the checkpoint lacks is an
    error naming it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    ckpt = resolve_checkpoint(ckpt)
    loaded, _, unexpected = dist_checkpointing.load(
        _model_sharded_state_dict(model_chunks), str(ckpt), strict=StrictHandling.RETURN_UNEXPECTED)
    lacking = sorted(k for k in unexpected if not k.endswith(EXTRA_STATE))
    if lacking:
        raise ValueError(f"{ckpt}: has no tensor {lacking[0]!r} (and {len(lacking) - 1} more) that "
                         f"this model needs; it was saved from a different architecture")
    _load_model_parts(model_chunks, loaded)
    return read_meta(ckpt)


def _load_model_parts(model_chunks, loaded):
    parts = [loaded["model"]] if len(model_chunks) == 1 else \
        [loaded[f"model{i}"] for i in range(len(model_chunks))]
    for m, part in zip(model_chunks, parts):
        module = _unwrap(m)
        own = {k: v for k, v in module.state_dict().items() if k.endswith(EXTRA_STATE)}
        # an extra state the checkpoint lacks is left out (unexpected) or read as None
        module.load_state_dict({**own, **{k: v for k, v in part.items()
                                          if v is not None or not k.endswith(EXTRA_STATE)}})


def _chained(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _prepare_distributed_optimizer(optimizer):
    """A never-stepped DistributedOptimizer cannot build its state dict; give it dummy state."""
    for opt in _chained(optimizer):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _restore_distributed_optimizer_steps(optimizer, loaded_opt):
    """dp_reshardable does not restore torch Adam's per-param 'step'; take it from param_groups."""
    chained = _chained(optimizer)
    if not any(hasattr(o, "_init_optimizer_states_with_dummy_values") for o in chained):
        return
    parts = [loaded_opt] if len(chained) == 1 else list(loaded_opt.values())
    for opt, part in zip(chained, parts):
        steps = {g["step"] for g in part["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                opt.optimizer.state[p]["step"] = torch.tensor(step)
