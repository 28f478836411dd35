"""Read full (global) model tensors from a torch_dist checkpoint without building Megatron.

Megatron's torch_dist format is a torch.distributed.checkpoint (DCP) folder whose tensors are
stored under their *global* keys and shapes, whatever TP/PP saved them (each rank wrote its
shard at its global offset; `.metadata` lists the global shape), so one process reads any
checkpoint. The reading itself is the project's one torch_dist reader
(averaging.torch_dist.TorchDistReader); this module is the export's view of it.
Layers are stacked on a leading axis: `decoder.layers.<...>` has shape [num_layers, ...].
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from megatron_btm.averaging.torch_dist import TorchDistReader


def list_tensors(ckpt: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{global key: (shape, dtype)} of every tensor stored in the checkpoint (no data read)."""
    reader = TorchDistReader(ckpt)
    try:
        return {k: (tuple(v.size), v.properties.dtype) for k, v in reader.tensors().items()}
    finally:
        reader.close()


def read_tensors(ckpt: str | os.PathLike, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Load the full tensors of `keys` (in their stored dtype) from a torch_dist checkpoint."""
    reader = TorchDistReader(ckpt)
    try:
        available = reader.tensors()
        keys = list(keys)
        missing = [k for k in keys if k not in available]
        if missing:
            model_keys = sorted(k for k in available if not k.startswith(("optimizer", "rng")))
            raise ValueError(f"{ckpt}: tensor(s) {missing} not in the checkpoint; it holds "
                             f"{model_keys[:12]}{' ...' if len(model_keys) > 12 else ''}")
        return {k: reader.read_tensor(k) for k in keys}
    finally:
        reader.close()
