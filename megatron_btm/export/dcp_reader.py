"""Read full (global) model tensors from a torch_dist checkpoint without building Megatron.

Megatron's torch_dist format is a torch.distributed.checkpoint (DCP) folder whose tensors are
stored under their *global* keys and shapes, whatever TP/PP saved them (each rank wrote its
shard at its global offset; `.metadata` lists the global shape). So a single process can read
any checkpoint with `dcp.load(..., no_dist=True)`, no process group and no model needed.
Layers are stacked on a leading axis: `decoder.layers.<...>` has shape [num_layers, ...].
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import torch


def list_tensors(ckpt: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{global key: (shape, dtype)} of every tensor stored in the checkpoint (no data read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    ckpt = Path(ckpt)
    if not (ckpt / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt}: no .metadata (not a torch_dist checkpoint folder)")
    md = FileSystemReader(str(ckpt)).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def read_tensors(ckpt: str | os.PathLike, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Load the full tensors of `keys` (in their stored dtype) from a torch_dist checkpoint."""
    import torch.distributed.checkpoint as dcp
    available = list_tensors(ckpt)
    keys = list(keys)
    missing = [k for k in keys if k not in available]
    if missing:
        model_keys = sorted(k for k in available if not k.startswith(("optimizer", "rng")))
        raise ValueError(f"{ckpt}: tensor(s) {missing} not in the checkpoint; it holds "
                         f"{model_keys[:12]}{' ...' if len(model_keys) > 12 else ''}")
    state = {k: torch.empty(available[k][0], dtype=available[k][1]) for k in keys}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    return state
