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
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import struct
import sys
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from megatron_btm.utils.io import atomic_write_bytes, atomic_write_json, fsync_dir, read_json

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
DCP_METADATA = ".metadata"
DATA_FILE = "__0_0.distcp"


class _CachedMetadataReader(FileSystemReader):
    """FileSystemReader that unpickles `.metadata` once (we load key by key)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._cached: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._cached is None:
            self._cached = super().read_metadata(*args, **kwargs)
        return self._cached


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
        self._reader = _CachedMetadataReader(self.path)
        self._files: dict[str, io.RawIOBase] = {}
        self._layouts: dict = {}  # validated record heads, see _read_record_into
        self.metadata: Metadata = self._reader.read_metadata()
        for info in self.metadata.storage_data.values():
            if getattr(info, "transform_descriptors", None):
                raise ValueError(f"{self.path}: uses DCP storage transforms {info.transform_descriptors}, "
                                 f"which the averaging reader does not support")
        for name in sorted({info.relative_path for info in self.metadata.storage_data.values()}):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name}: file not found (named in {self.path / DCP_METADATA})")

    def tensors(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}

    def objects(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items()
                if isinstance(v, BytesStorageMetadata)]

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
            info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            f = self._file(info.relative_path)
            target = out[chunk_slices(chunk)]
            if not _read_record_into(f, info.offset, info.length, target, self._layouts):
                record = torch.load(_FileSlice(f, info.offset, info.length), map_location="cpu", weights_only=True)
                target.copy_(record.reshape(target.shape))
        return out

    def prefetch(self, key: str) -> None:
        """Ask the kernel to start reading tensor `key` into the page cache (non-blocking), so
        that reads from several experts' files proceed in parallel with our own work."""
        if not hasattr(os, "posix_fadvise"):
            return
        for chunk in self._tensor_md(key).chunks:
            info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
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
        md = self._tensor_md(key)
        out = torch.empty(md.size, dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load({key: out}, storage_reader=self._reader, no_dist=True)
        return out

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
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
        info = self.metadata.storage_data[MetadataIndex(key)]
        with open(self.path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def read_common(self) -> dict:
        path = self.path / "common.pt"
        if not path.is_file():
            return {}
        return torch.load(path, map_location="cpu", weights_only=False)


class _FileSlice(io.RawIOBase):
    """Read-only view of bytes [offset, offset + length) of an open file (one DCP record)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence]
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._len - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n]) if n else 0
        self._pos += got
        return got


_DATA_MEMBER = re.compile(r"^[^/]+/data/\d+$")


_HEAD_BYTES = 4096


def _read_record_into(f, offset: int, length: int, target: torch.Tensor, layouts: dict) -> bool:
    """Read one `torch.save` record holding a plain tensor straight into `target`; False if the
    record is anything else (the caller then falls back to torch.load).

    The first record of each (length, dtype, shape) is validated in full (`_data_start`); its
    head — everything before the tensor bytes: data.pkl (dtype, shape, strides) and the zip
    headers — is remembered in `layouts`. A later record with the same length and byte-identical
    head has the same layout, so its check is one small read (Megatron stacks layers: every
    layer's chunk of a tensor looks alike).
    """
    if sys.byteorder != "little" or not target.is_contiguous() or target.dim() == 0:
        return False
    nbytes = target.numel() * target.element_size()
    f.seek(offset)
    head = f.read(min(_HEAD_BYTES, length))
    key = (length, target.dtype, tuple(target.shape))
    known = layouts.get(key)
    if known is not None and head[: len(known)] == known:
        start = len(known)
    else:
        start = _data_start(f, offset, length, target, nbytes)
        if start is None:
            return False
        if start <= len(head):
            layouts[key] = head[:start]
    f.seek(offset + start)
    dest = memoryview(target.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < nbytes:
        got = f.readinto(dest[done:])
        if not got:
            raise ValueError(f"{getattr(f, 'name', 'checkpoint file')}: truncated (record at byte {offset})")
        done += got
    return True


def _data_start(f, offset: int, length: int, target: torch.Tensor, nbytes: int) -> int | None:
    """Offset of the tensor bytes inside a record if it is exactly `target`'s bytes, else None.

    A torch.save record is an uncompressed zip: `data.pkl` describes the tensor and each storage
    is one member `<archive>/data/<n>`. `map_location="meta"` unpickles the description without
    reading the data (a few KB).
    """
    record = _FileSlice(f, offset, length)
    meta = torch.load(record, map_location="meta", weights_only=True)
    if not (isinstance(meta, torch.Tensor) and meta.dtype == target.dtype and meta.shape == target.shape
            and meta.is_contiguous() and meta.storage_offset() == 0
            and meta.untyped_storage().nbytes() == nbytes):
        return None
    with zipfile.ZipFile(record) as zf:
        members = [zi for zi in zf.infolist() if _DATA_MEMBER.match(zi.filename)]
        if len(members) != 1 or members[0].compress_type != zipfile.ZIP_STORED or members[0].file_size != nbytes:
            return None
        header_offset = members[0].header_offset
    f.seek(offset + header_offset)
    header = f.read(30)  # zip local file header: name and extra-field lengths at bytes 26..29
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return header_offset + 30 + name_len + extra_len


@contextlib.contextmanager
def _no_crc32():
    """torch.save without its CRC32 pass (3x faster writes; nothing reading DCP checks it,
    and the forest records sha256 of every file)."""
    from torch.utils.serialization import config
    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = old


def chunk_slices(chunk: ChunkStorageMetadata) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))


class TorchDistWriter:
    """Write a torch_dist checkpoint chunk by chunk; call `finish()` last.

    Memory: only the chunk being written. The folder is complete (loadable) only after
    `finish()`; callers build it inside `utils.io.atomic_dir` so nothing half-written is ever
    visible under the final name.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path / DATA_FILE, "wb")
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, object] = {}
        self.bytes_written = 0

    def declare_tensor(self, key: str, size: torch.Size, dtype: torch.dtype) -> None:
        if key in self._tensors or key in self._objects:
            raise ValueError(f"{key}: written twice")
        self._tensors[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=torch.Size(size), chunks=[])

    def write_chunk(self, key: str, offsets: tuple[int, ...], chunk: torch.Tensor) -> None:
        md = self._tensors[key]
        if chunk.dtype != md.properties.dtype or len(offsets) != len(md.size):
            raise ValueError(f"{key}: chunk {chunk.dtype}{list(chunk.shape)} at {offsets} does not fit "
                             f"{md.properties.dtype}{list(md.size)}")
        chunk = chunk.detach().cpu().contiguous()
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
            chunk = chunk.clone()  # torch.save writes a view's whole storage: keep only the chunk
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        start = self._file.tell()
        with _no_crc32():
            torch.save(chunk, self._file)
        length = self._file.tell() - start
        index = MetadataIndex(key, torch.Size(offsets))
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=chunk.shape))
        self._storage[index] = _StorageInfo(relative_path=DATA_FILE, offset=start, length=length)
        self.bytes_written += length

    def write_object_bytes(self, key: str, raw: bytes) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        if key in self._tensors or key in self._objects:
            raise ValueError(f"{key}: written twice")
        start = self._file.tell()
        self._file.write(raw)
        self._objects[key] = BytesStorageMetadata()
        self._storage[MetadataIndex(key)] = _StorageInfo(relative_path=DATA_FILE, offset=start, length=len(raw))
        self.bytes_written += len(raw)

    def finish(self, common: dict | None = None) -> None:
        """fsync the data, then write DCP .metadata, Megatron's common.pt and metadata.json."""
        for key, md in self._tensors.items():
            covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
            if covered != md.size.numel():  # DCP would silently leave the gap uninitialised
                raise AssertionError(f"{key}: chunks cover {covered} of {md.size.numel()} elements")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        metadata = Metadata(state_dict_metadata={**self._tensors, **self._objects},
                            storage_data=self._storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.path), save_id=str(uuid.uuid4())))
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
        metadata.version = CURRENT_DCP_VERSION
        atomic_write_bytes(self.path / DCP_METADATA, pickle.dumps(metadata))
        buf = io.BytesIO()
        torch.save(common or {}, buf)
        atomic_write_bytes(self.path / "common.pt", buf.getvalue())
        atomic_write_json(self.path / "metadata.json", MEGATRON_METADATA)
        fsync_dir(self.path)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


def iter_files(path: str | os.PathLike) -> Iterator[Path]:
    """Every regular file of a checkpoint folder (for read-speed measurements, checksums)."""
    return (p for p in sorted(Path(path).rglob("*")) if p.is_file())
