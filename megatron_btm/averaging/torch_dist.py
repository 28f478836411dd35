"""Stream Megatron torch_dist checkpoints one tensor at a time (read and write).

A torch_dist checkpoint folder (Megatron dist_checkpointing over PyTorch Distributed
Checkpoint, DCP) holds:
  metadata.json        Megatron: {"sharded_backend": "torch_dist", ...}
  common.pt            Megatron: the non-sharded part of the state dict (torch.save)
  .metadata            DCP: pickled `Metadata` — per key a `TensorStorageMetadata` (global size,
                       dtype, chunks = (offsets, sizes) boxes that tile the tensor) or a
                       `BytesStorageMetadata` (a Megatron ShardedObject), and `storage_data`:
                       `MetadataIndex(key, chunk offsets)` → `_StorageInfo(file, offset, length)`
  __<rank>_<i>.distcp  DCP: the chunks, each one `torch.save`d record at (offset, length)

Reading: DCP's metadata says where each chunk of a key lives; `TorchDistReader.read_tensor`
puts every chunk in its place in one full-size (global-shape) tensor, so checkpoints saved at
different TP/PP read the same. A chunk that is a plain contiguous tensor record is read with one
`readinto` straight into its destination (DCP's own `load` — kept as `read_tensor_dcp`, and
used by the tests as the reference — goes through `torch.load` of the record and a copy, ~2–4x
slower here). Writing appends each chunk as a `torch.save` record to one .distcp file as soon as
it is produced and writes the DCP `Metadata` last, exactly as DCP's FileSystemWriter lays it
out; Megatron's `dist_checkpointing.load` (hence any TP/PP) reads it.

Start-up: DCP's `.metadata` is read and written without importing `torch.distributed.checkpoint`
(~0.7 s, a tenth of a whole 8-expert average): see dcp_metadata.py. Chunk records are read in
place by dcp_records.py.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch

from megatron_btm.averaging.dcp_metadata import (DATA_FILE, DCP_METADATA, dump_metadata,
                                                 emit_without_dcp, entry_kind, read_metadata)
from megatron_btm.averaging.dcp_records import FileSlice, no_crc32, read_record_into
from megatron_btm.utils.chunk_writer import ChunkFileWriter
from megatron_btm.utils.io import atomic_write_bytes, atomic_write_json, fsync_dir, read_json

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class TorchDistReader:
    """Read-only view of one torch_dist checkpoint folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: checkpoint folder not found")
        megatron_md = read_json(self.path / "metadata.json")
        backend = megatron_md.get("sharded_backend") if isinstance(megatron_md, dict) else None
        if backend != "torch_dist":
            raise ValueError(f"{self.path / 'metadata.json'}: sharded_backend={backend!r}, only "
                             f"'torch_dist' checkpoints can be averaged")
        if not (self.path / DCP_METADATA).is_file():
            raise FileNotFoundError(f"{self.path / DCP_METADATA}: file not found (incomplete checkpoint?)")
        self._files: dict[str, io.RawIOBase] = {}
        self._layouts: dict = {}  # validated record heads, see read_record_into
        self.metadata = read_metadata(self.path)
        # storage index: (key, chunk offsets or None for an object) -> _StorageInfo
        self._storage = {(idx.fqn, None if idx.offset is None else tuple(idx.offset)): info
                         for idx, info in self.metadata.storage_data.items()}
        for info in self._storage.values():
            if getattr(info, "transform_descriptors", None):
                raise ValueError(f"{self.path}: uses DCP storage transforms {info.transform_descriptors}, "
                                 f"which the averaging reader does not support")
        for name in sorted({info.relative_path for info in self._storage.values()}):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name}: file not found (named in {self.path / DCP_METADATA})")

    def tensors(self) -> dict[str, Any]:
        """key -> DCP TensorStorageMetadata (fields `size`, `properties.dtype`, `chunks`)."""
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if entry_kind(v) == "tensor"}

    def objects(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if entry_kind(v) == "bytes"]

    def _info(self, key: str, offsets=None):
        return self._storage[(key, None if offsets is None else tuple(offsets))]

    def read_tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full (global-shape) tensor `key`, reassembled from its chunks, into `out` if given
        (contiguous, right shape and dtype) so callers can reuse one buffer.

        Each chunk is read straight from its file into its place in `out` when its record is a
        plain contiguous tensor (one read, no intermediate copy); any other record goes through
        `torch.load` and a copy. `read_tensor_dcp` is the same through DCP's own load path.
        """
        md = self._tensor_md(key)
        if out is None:
            out = torch.empty(md.size, dtype=md.properties.dtype)
        elif out.shape != md.size or out.dtype != md.properties.dtype or not out.is_contiguous():
            raise ValueError(f"{key}: out is {out.dtype}{list(out.shape)}, need contiguous "
                             f"{md.properties.dtype}{list(md.size)}")
        for chunk in md.chunks:
            self._read_chunk_into(key, chunk, out[chunk_slices(chunk)])
        return out

    def read_chunk(self, key: str, chunk) -> torch.Tensor:
        """One stored chunk of tensor `key` (an entry of `tensors()[key].chunks`), alone: for
        streaming a tensor larger than memory allows chunk by chunk."""
        md = self._tensor_md(key)
        out = torch.empty(tuple(chunk.sizes), dtype=md.properties.dtype)
        self._read_chunk_into(key, chunk, out)
        return out

    def _read_chunk_into(self, key: str, chunk, target: torch.Tensor) -> None:
        info = self._info(key, chunk.offsets)
        f = self._file(info.relative_path)
        if not read_record_into(f, info.offset, info.length, target, self._layouts):
            record = torch.load(FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True)
            target.copy_(record.reshape(target.shape))

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading tensor `key` into the page cache (non-blocking), so
        that reads from several experts' files proceed in parallel with our own work."""
        if not hasattr(os, "posix_fadvise"):
            return
        for chunk in self._tensor_md(key).chunks:
            info = self._info(key, chunk.offsets)
            os.posix_fadvise(self._file(info.relative_path).fileno(), info.offset, info.length,
                             os.POSIX_FADV_WILLNEED)

    def _file(self, relative_path: str):
        f = self._files.get(relative_path)
        if f is None:
            f = self._files[relative_path] = open(self.path / relative_path, "rb", buffering=0)
            if hasattr(os, "posix_fadvise"):  # we read front to back: ask for a larger readahead
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return f

    def read_tensor_dcp(self, key: str) -> torch.Tensor:
        """Reference path: `torch.distributed.checkpoint.load` of this one key (no process group)."""
        import torch.distributed.checkpoint as dcp
        md = self._tensor_md(key)
        out = torch.empty(md.size, dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load({key: out}, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return out

    def _tensor_md(self, key: str):
        md = self.metadata.state_dict_metadata.get(key)
        if entry_kind(md) != "tensor":
            raise KeyError(f"{self.path}: no tensor {key!r}")
        covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
        if covered != md.size.numel():
            raise ValueError(f"{self.path}: tensor {key!r} is incomplete (its chunks cover {covered} of "
                             f"{md.size.numel()} elements); was it saved by all ranks?")
        return md

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read_object_bytes(self, key: str) -> bytes:
        """The raw serialized bytes of a ShardedObject entry (copied verbatim, never unpickled)."""
        info = self._info(key)
        with open(self.path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def read_common(self) -> dict:
        path = self.path / "common.pt"
        if not path.is_file():
            return {}
        return torch.load(path, map_location="cpu", weights_only=False)


def chunk_slices(chunk) -> tuple[slice, ...]:
    """Index of a DCP chunk (fields `offsets`, `sizes`) in its full tensor."""
    return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))


class TorchDistWriter(ChunkFileWriter):
    """Write a torch_dist checkpoint chunk by chunk; call `finish()` last.

    Memory: only the chunk being written. The folder is complete (loadable) only after
    `finish()`; callers build it inside `utils.io.atomic_dir` so nothing half-written is ever
    visible under the final name.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, DATA_FILE)

    def declare_tensor(self, key: str, size: torch.Size, dtype: torch.dtype) -> None:
        self._check_new(key)
        self._tensors[key] = (torch.Size(size), dtype, [])

    def write_chunk(self, key: str, offsets: tuple[int, ...], chunk: torch.Tensor) -> None:
        size, dtype, chunks = self._tensors[key]
        if chunk.dtype != dtype or len(offsets) != len(size):
            raise ValueError(f"{key}: chunk {chunk.dtype}{list(chunk.shape)} at {offsets} does not fit "
                             f"{dtype}{list(size)}")
        chunk = chunk.detach().cpu().contiguous()
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
            chunk = chunk.clone()  # torch.save writes a view's whole storage: keep only the chunk
        self._crc = zlib.crc32(chunk.reshape(-1).view(torch.uint8).numpy(), self._crc)
        start = self._file.tell()
        with no_crc32():
            torch.save(chunk, self._file)
        chunks.append((torch.Size(offsets), chunk.shape))
        self._record(key, offsets, start, self._file.tell() - start)

    def finish(self, common: dict | None = None) -> None:
        """fsync the data, then write DCP .metadata, Megatron's common.pt and metadata.json."""
        save_id, name = self._close_data()
        if emit_without_dcp():
            raw = dump_metadata(self._tensors, self._objects, self._storage, name, save_id)
        else:
            raw = pickle.dumps(self._dcp_metadata(save_id, name))
        atomic_write_bytes(self.path / DCP_METADATA, raw)
        buf = io.BytesIO()
        torch.save(common or {}, buf)
        atomic_write_bytes(self.path / "common.pt", buf.getvalue())
        atomic_write_json(self.path / "metadata.json", MEGATRON_METADATA)
        fsync_dir(self.path)

    def _dcp_metadata(self, save_id: str, checkpoint_id: str = ""):
        """DCP's own `Metadata` of what was written (imports torch.distributed.checkpoint)."""
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
        from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                           MetadataIndex, StorageMeta, TensorProperties,
                                                           TensorStorageMetadata)
        state_dict_md: dict[str, Any] = {
            key: TensorStorageMetadata(properties=TensorProperties(dtype=dtype), size=size,
                                       chunks=[ChunkStorageMetadata(offsets=o, sizes=s) for o, s in chunks])
            for key, (size, dtype, chunks) in self._tensors.items()}
        state_dict_md.update({key: BytesStorageMetadata() for key in self._objects})
        storage = {MetadataIndex(key, None if offsets is None else torch.Size(offsets)):
                   _StorageInfo(relative_path=DATA_FILE, offset=start, length=length)
                   for (key, offsets), (start, length) in self._storage.items()}
        metadata = Metadata(state_dict_metadata=state_dict_md, storage_data=storage,
                            storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id))
        metadata.version = CURRENT_DCP_VERSION
        return metadata

