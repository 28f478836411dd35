"""`btm import-hf`'s checkpoint writer without torch: the same torch_dist folder the torch path
(`averaging.torch_dist.TorchDistWriter`) writes, byte for byte in `__0_0.distcp`, common.pt and
metadata.json, and the same DCP `Metadata` in `.metadata` (tests/hf/test_import_torchfree.py).

Used for safetensors folders whose tensors keep their stored dtype (`--dtype auto`, or the dtype
they already have); a `pytorch_model.bin` (read by `torch.load`) or a dtype conversion goes
through torch. Each tensor is read with `readinto` straight into its Megatron layout in one
reused byte buffer (`mapping.row_moves`), written as a `torch.save` record
(`torch_format.write_tensor_record`: a zip whose one storage member is those bytes), and the
buffer is reused for the next: the peak is the interpreter plus about one tensor. Only GPT-2's
transposed Conv1D weights need numpy. The DCP classes and torch dtypes in the pickles are
GLOBAL opcodes naming them (`torch_format`), so whoever loads the checkpoint (with torch)
gets torch's own objects.
"""
from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

from megatron_btm.hf import convert, torch_format
from megatron_btm.hf.mapping import extra_state_keys, row_moves
from megatron_btm.hf.reader import ST_DTYPES
from megatron_btm.utils.chunk_writer import ChunkFileWriter
from megatron_btm.utils.dtypes import torch_dtype_name
from megatron_btm.utils.io import atomic_write_bytes, atomic_write_json, fsync_dir

DATA_FILE, DCP_METADATA = "__0_0.distcp", ".metadata"  # as averaging.dcp_metadata
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,  # as torch_dist.py
                     "common_backend": "torch", "common_backend_version": 1}


def usable(weights, plan, dtype: str) -> bool:
    """Whether this writer can import `plan`: safetensors, one stored dtype per Megatron tensor,
    kept as stored (`dtype` "auto" or that dtype), every record under 4 GiB (no zip64)."""
    if not weights.safetensors:
        return False
    want = None if dtype == "auto" else torch_dtype_name(dtype)
    for _, _, _, keys in plan:
        stored = {weights.dtype_name(k) for k in keys}
        if len(stored) != 1 or (want is not None and ST_DTYPES[stored.pop()][0] != want):
            return False
        if sum(weights.row_bytes(k) * max(1, (weights.shape(k) or (1,))[0]) for k in keys) >= 2**32 - 2**20:
            return False
    return True


class Writer(ChunkFileWriter):
    """TorchDistWriter without torch: chunks are raw bytes with a shape and a safetensors dtype."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, DATA_FILE)

    def declare_tensor(self, key: str, size: tuple[int, ...], st_dtype: str) -> None:
        self._check_new(key)
        self._tensors[key] = (tuple(size), st_dtype, [])  # key -> size, safetensors dtype, chunks

    def write_chunk(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...], data) -> None:
        size, st_dtype, chunks = self._tensors[key]
        numel = math.prod(shape)
        if len(offsets) != len(size) or len(shape) != len(size) or len(data) != numel * ST_DTYPES[st_dtype][2]:
            raise ValueError(f"{key}: chunk of {len(data)} bytes, shape {list(shape)} at {offsets} does "
                             f"not fit {st_dtype}{list(size)}")
        self._crc = zlib.crc32(data, self._crc)
        start = self._file.tell()
        length = torch_format.write_tensor_record(self._file, data, ST_DTYPES[st_dtype][1], shape, numel)
        chunks.append((tuple(offsets), tuple(shape)))
        self._record(key, offsets, start, length)

    def finish(self, common: dict) -> None:
        """fsync the data, then write .metadata, common.pt and metadata.json (as TorchDistWriter)."""
        save_id, name = self._close_data()
        tensors = {k: (size, ST_DTYPES[st][0], chunks) for k, (size, st, chunks) in self._tensors.items()}
        atomic_write_bytes(self.path / DCP_METADATA, torch_format.dcp_metadata(
            tensors, self._objects, self._storage, DATA_FILE, name, save_id))
        atomic_write_bytes(self.path / "common.pt", torch_format.save_bytes(common))
        atomic_write_json(self.path / "metadata.json", MEGATRON_METADATA)
        fsync_dir(self.path)


class _Bytes:
    """One reusable byte buffer (importer._Buffer without torch): a new size frees the old one
    and hands its pages back first."""

    def __init__(self):
        self._b: bytearray | None = None

    def take(self, n: int) -> memoryview:
        if self._b is None or len(self._b) != n:
            from megatron_btm.hf.importer import _malloc_trim
            self._b = None
            _malloc_trim()
            self._b = bytearray(n)
        return memoryview(self._b)


def write_checkpoint(path: Path, plan, weights, cfg, padded: int) -> None:
    """Write the torch_dist files of `plan` (importer.plan_import) into the folder `path`."""
    from megatron_btm.hf.importer import STREAM_BYTES, _nbytes
    writer, buffer = Writer(path), _Bytes()
    try:
        for key, rule, layer, keys in plan:
            data = None  # the previous tensor's view: let `buffer` reuse or free its bytes
            st = weights.dtype_name(keys[0])
            if layer is None and rule.kind in ("copy", "vocab") and _nbytes(weights, keys[0]) > STREAM_BYTES:
                _write_in_rows(writer, key, weights, keys[0], padded if rule.kind == "vocab"
                               else weights.shape(keys[0])[0], buffer)
                continue
            shape, data = _megatron_tensor(rule, keys, weights, cfg, padded, buffer)
            if layer is None:
                writer.declare_tensor(key, shape, st)
                writer.write_chunk(key, (0,) * len(shape), shape, data)
                continue
            at, stack = convert.stack_index(cfg, layer)  # MoE experts: (layer, expert)
            if not any(at):
                writer.declare_tensor(key, (*stack, *shape), st)
            writer.write_chunk(key, at + (0,) * len(shape), (1,) * len(at) + shape, data)
        empty = torch_format.save_bytes([None])  # an empty _extra_state ShardedObject
        for key in extra_state_keys(cfg):
            writer.write_object_bytes(key, empty)
        writer.finish(common={"run_state": {"step": 0}})
    finally:
        writer.abort()


def _megatron_tensor(rule, keys: list[str], weights, cfg, padded: int, buffer: _Bytes):
    """(shape, bytes) of one Megatron tensor (a layer's slice) built from its HF tensor(s)."""
    shapes = [weights.shape(k) for k in keys]
    itemsize = ST_DTYPES[weights.dtype_name(keys[0])][2]
    if rule.kind == "vocab":  # small tables: the rows, then zero rows up to the padded size
        rows, *rest = shapes[0]
        row = weights.row_bytes(keys[0])
        out = buffer.take(padded * row)
        weights.read_rows_into(keys[0], 0, rows, out[:rows * row])
        out[rows * row:] = bytes(len(out) - rows * row)
        return (padded, *rest), out
    if rule.kind in ("transpose", "qkv_conv1d"):  # GPT-2's Conv1D: [in, out] -> rows [out, in]
        import numpy as np
        src = bytearray(math.prod(shapes[0]) * itemsize)
        weights.read_rows_into(keys[0], 0, shapes[0][0] if shapes[0] else 1, memoryview(src))
        a = np.frombuffer(src, dtype=f"u{itemsize}").reshape(shapes[0])
        rows = a.T if a.ndim == 2 else a
        if rule.kind == "transpose":
            out = buffer.take(a.nbytes)
            np.frombuffer(out, dtype=a.dtype).reshape(rows.shape)[...] = rows
            return tuple(rows.shape), out
        n = rows.shape[0] // 3  # [q | k | v] rows -> the fused per-group order
        out = buffer.take(a.nbytes)
        dest = np.frombuffer(out, dtype=a.dtype).reshape(rows.shape)
        for i, first, end, at in row_moves("qkv", [n, n, n], cfg):
            dest[at:at + end - first] = rows[i * n + first:i * n + end]
        return tuple(rows.shape), out
    moves = row_moves(rule.kind, [s[0] for s in shapes], cfg) if all(shapes) else None
    if moves is None or len({s[1:] for s in shapes}) != 1:
        raise ValueError(f"{keys}: shapes {[list(s) for s in shapes]} do not combine as {rule.kind!r}")
    row = weights.row_bytes(keys[0])
    out = buffer.take(sum(s[0] for s in shapes) * row)
    for i, first, end, at in moves:
        weights.read_rows_into(keys[i], first, end, out[at * row:(at + end - first) * row])
    return (sum(s[0] for s in shapes), *shapes[0][1:]), out


def _write_in_rows(writer: Writer, key: str, weights, hf_key: str, rows: int, buffer: _Bytes) -> None:
    """importer._write_in_rows: a large table in slices of about STREAM_BYTES, zero rows padding
    it to `rows`, in the same chunks."""
    from megatron_btm.hf.importer import STREAM_BYTES, _nbytes
    have, *rest = weights.shape(hf_key)
    step = max(1, STREAM_BYTES // max(1, _nbytes(weights, hf_key) // max(have, 1)))
    st, row = weights.dtype_name(hf_key), weights.row_bytes(hf_key)
    writer.declare_tensor(key, (rows, *rest), st)
    start = 0
    while start < have:
        n = min(step, have - start)
        chunk = buffer.take(n * row)
        weights.read_rows_into(hf_key, start, start + n, chunk)
        writer.write_chunk(key, (start, *[0] * len(rest)), (n, *rest), chunk)
        start += n
        del chunk  # before the next take()
    if rows > have:
        writer.write_chunk(key, (have, *[0] * len(rest)), (rows - have, *rest), bytes((rows - have) * row))
