"""Copy an MoE torch_dist checkpoint chunk by chunk, dropping one expert or replacing tensors.

Used by `btm moe remove` (drop index e on the expert axis of every expert and router tensor,
renumber the experts' objects) and by `btm merge-moe --router hidden` (the router computed on
the uniform-router checkpoint replaces its zeros). Memory: one stored chunk at a time (one
layer of one expert in Megatron's layout), plus the replacement tensors.
"""
from __future__ import annotations

from typing import Mapping

import torch

from megatron_btm.averaging.apply import MODEL_KEY_PREFIXES, model_common  # noqa: F401 (re-exported)
from megatron_btm.averaging.torch_dist import TorchDistReader, TorchDistWriter, chunk_slices
from megatron_btm.moe import layout


def _drop(chunk, tensor: torch.Tensor | None, removed: int):
    """(offsets, tensor) of a chunk after dropping expert `removed` on the expert axis, or None
    when nothing of it is left. `tensor=None`: only tell whether the chunk is kept."""
    ax = layout.EXPERT_AXIS
    start, size = chunk.offsets[ax], chunk.sizes[ax]
    offsets = list(chunk.offsets)
    if start <= removed < start + size:
        if size == 1:
            return None
        if tensor is not None:
            keep = [i for i in range(size) if i != removed - start]
            tensor = tensor.index_select(ax, torch.tensor(keep))
    elif start > removed:
        offsets[ax] = start - 1
    return tuple(offsets), tensor


def rewrite(reader: TorchDistReader, writer: TorchDistWriter, *, drop_expert: int | None = None,
            replace: Mapping[str, torch.Tensor] | None = None, progress: bool = True,
            desc: str = "copy") -> int:
    """Write every model tensor and object of `reader` into `writer` (the caller finishes it).

    `replace`: {key: full tensor of the same shape and dtype} written in the source's chunk
    layout instead of the stored values. `drop_expert`: index removed from axis 1 of every
    tensor with an expert axis (layout.has_expert_axis) and from the experts' object names.
    Returns the number of tensors written.
    """
    from tqdm import tqdm
    replace = dict(replace or {})
    tensors = {k: md for k, md in reader.tensors().items() if k.startswith(MODEL_KEY_PREFIXES)}
    unknown = sorted(set(replace) - set(tensors))
    if unknown:
        raise KeyError(f"{reader.path}: no tensor {unknown[0]!r} to replace")
    bar = tqdm(total=len(tensors), desc=desc, unit="tensor", disable=not progress)
    for key, md in tensors.items():
        dtype, size = md.properties.dtype, list(md.size)
        full = replace.get(key)
        if full is not None and (list(full.shape) != size or full.dtype != dtype):
            raise ValueError(f"{key}: replacement is {full.dtype}{list(full.shape)}, the checkpoint "
                             f"holds {dtype}{size}")
        drop = drop_expert is not None and layout.has_expert_axis(key)
        if drop:
            size[layout.EXPERT_AXIS] -= 1
        writer.declare_tensor(key, torch.Size(size), dtype)
        for chunk in md.chunks:
            if drop and _drop(chunk, None, drop_expert) is None:
                continue  # the removed expert's own chunk: never read
            data = full[chunk_slices(chunk)] if full is not None else reader.read_chunk(key, chunk)
            offsets = tuple(chunk.offsets)
            if drop:
                offsets, data = _drop(chunk, data, drop_expert)
            writer.write_chunk(key, offsets, data)
        bar.update(1)
    bar.close()
    for key in reader.objects():
        if not key.startswith(MODEL_KEY_PREFIXES):
            continue
        new = layout.renumber_expert_object(key, drop_expert) if drop_expert is not None else key
        if new is not None:
            writer.write_object_bytes(new, reader.read_object_bytes(key))
    return len(tensors)

