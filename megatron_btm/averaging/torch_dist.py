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

Start-up: importing `torch.distributed.checkpoint` costs ~0.7 s (it pulls in DTensor and sympy),
a tenth of a whole 8-expert average. The reader therefore unpickles `.metadata` with stand-in
classes that keep DCP's field names (`_read_dcp_metadata`; DCP's own unpickler is the fallback
when that fails), and the writer pickles `.metadata` under DCP's class names without importing
them (`_dump_dcp_metadata`, for the torch versions it was checked against; DCP's own classes
otherwise).
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
from typing import Any, Iterator

import torch

from megatron_btm.utils.io import atomic_write_bytes, atomic_write_json, fsync_dir, read_json

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
DCP_METADATA = ".metadata"
DATA_FILE = "__0_0.distcp"


_DCP_PACKAGE = "torch.distributed.checkpoint"


class _Stub:
    """Stand-in for a DCP metadata class while unpickling `.metadata`: takes the pickled state
    as attributes, so it answers to the same field names (`size`, `chunks`, `offsets`, ...)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(p is None or isinstance(p, dict) for p in state):
            for part in state:  # (dict, slots dict) as dataclasses with __slots__ pickle
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        elif type(self).__name__ == "TensorProperties" and isinstance(state, tuple) and state:
            self.dtype = state[0]  # TensorProperties.__getstate__: (dtype, layout, ...)
        else:
            raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}: {type(state).__name__}")


class _LightUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` without importing `torch.distributed.checkpoint`."""

    _stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == _DCP_PACKAGE or module.startswith(_DCP_PACKAGE + "."):
            if name == "_MEM_FORMAT_ENCODING":  # an Enum pickled as a call with its value
                return lambda value: value
            if name not in self._stubs:
                self._stubs[name] = type(name, (_Stub,), {})
            return self._stubs[name]
        return super().find_class(module, name)


def _kind(md: object) -> str:
    """'tensor', 'bytes' or '' for a state_dict_metadata entry (stand-in or DCP's own class)."""
    return {"TensorStorageMetadata": "tensor", "BytesStorageMetadata": "bytes"}.get(type(md).__name__, "")


def _read_dcp_metadata(path: Path) -> Any:
    """DCP `Metadata` of `path/.metadata`: stand-ins first, DCP's own classes as the fallback."""
    raw = (path / DCP_METADATA).read_bytes()
    try:
        md = _LightUnpickler(io.BytesIO(raw)).load()
        # every field the reader uses must be there (AttributeError otherwise: fall back)
        _ = [(i.fqn, i.offset, s.relative_path, s.offset, s.length) for i, s in md.storage_data.items()]
        _ = [(v.size, v.properties.dtype, [(c.offsets, c.sizes) for c in v.chunks])
             for v in md.state_dict_metadata.values() if _kind(v) == "tensor"]
        return md
    except Exception:  # a DCP layout the stand-ins do not cover: DCP's own unpickling
        import torch.distributed.checkpoint.filesystem  # noqa: F401 (registers the classes)
        return pickle.loads(raw)


# ---- writing DCP's .metadata without importing DCP ------------------------------------------
# The pickle names DCP's classes (module, name) and carries the state each one pickles with in
# torch 2.13 (dataclass __dict__; TensorProperties' tuple; _StorageInfo without None fields), so
# `pickle.load` under DCP builds the same objects as DCP's own writer (tested: equal to the
# Metadata built from DCP's classes, and Megatron loads the result). Used only for the torch
# versions in _EMIT_TORCH and while DCP is not imported anyway; otherwise DCP's classes are used.
_EMIT_TORCH = ("2.13.",)
_DCP_FS = _DCP_PACKAGE + ".filesystem"
_DCP_MD = _DCP_PACKAGE + ".metadata"


def _emit_without_dcp() -> bool:
    return torch.__version__.startswith(_EMIT_TORCH) and _DCP_PACKAGE not in sys.modules


class _Named:
    """Base of the stand-ins the writer pickles under a DCP class name (see _DcpPickler)."""
    dcp_name: tuple[str, str] = ("", "")

    def __init__(self, **state: Any):
        self.__dict__.update(state)


def _named(module: str, name: str) -> type:
    return type(name, (_Named,), {"dcp_name": (module, name)})


_W = {n: _named(_DCP_MD, n) for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                      "BytesStorageMetadata", "MetadataIndex", "StorageMeta")}
_W["_StorageInfo"] = _named(_DCP_FS, "_StorageInfo")
_MemFormat = _named(_DCP_MD, "_MEM_FORMAT_ENCODING")


class _ContiguousFormat:
    """_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT, which an Enum pickles as a call with 0."""

    def __reduce__(self):
        return (_MemFormat, (0,))


class _TensorProperties(_Named):
    dcp_name = (_DCP_MD, "TensorProperties")

    def __getstate__(self):  # as DCP's TensorProperties.__getstate__
        return (self.dtype, torch.strided, False, _ContiguousFormat(), False)


class _DcpPickler(pickle._Pickler):  # the Python pickler: its save_global can be overridden
    def save_global(self, obj, name=None):
        target = getattr(obj, "dcp_name", None) if isinstance(obj, type) else None
        if not target:
            return super().save_global(obj, name)
        module, qualname = target
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)


def _dump_dcp_metadata(tensors: dict, objects: list, storage: dict, checkpoint_id: str, save_id: str) -> bytes:
    md: dict[str, Any] = {
        key: _W["TensorStorageMetadata"](
            properties=_TensorProperties(dtype=dtype), size=size,
            chunks=[_W["ChunkStorageMetadata"](offsets=o, sizes=s) for o, s in chunks])
        for key, (size, dtype, chunks) in tensors.items()}
    md.update({key: _W["BytesStorageMetadata"]() for key in objects})
    index = {}
    for (key, offsets), (start, length) in storage.items():
        fields = {"fqn": key, "index": None}
        if offsets is not None:
            fields["offset"] = torch.Size(offsets)
        index[_W["MetadataIndex"](**fields)] = _W["_StorageInfo"](relative_path=DATA_FILE, offset=start,
                                                                   length=length)
    metadata = _W["Metadata"](
        state_dict_metadata=md, planner_data=None, storage_data=index,
        storage_meta=_W["StorageMeta"](checkpoint_id=checkpoint_id, save_id=save_id, load_id=None, modules=[]),
        version="1.0.0")
    buf = io.BytesIO()
    _DcpPickler(buf, protocol=2).dump(metadata)
    return buf.getvalue()


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
        self._layouts: dict = {}  # validated record heads, see _read_record_into
        self.metadata = _read_dcp_metadata(self.path)
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
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if _kind(v) == "tensor"}

    def objects(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if _kind(v) == "bytes"]

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
            info = self._info(key, chunk.offsets)
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
        if _kind(md) != "tensor":
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


def chunk_slices(chunk) -> tuple[slice, ...]:
    """Index of a DCP chunk (fields `offsets`, `sizes`) in its full tensor."""
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
        # plain records until finish() builds DCP's Metadata from them
        self._tensors: dict[str, tuple[torch.Size, torch.dtype, list]] = {}  # key -> size, dtype, chunks
        self._objects: list[str] = []
        self._storage: dict[tuple, tuple[int, int]] = {}  # (key, offsets | None) -> (offset, length)
        self.bytes_written = 0

    def declare_tensor(self, key: str, size: torch.Size, dtype: torch.dtype) -> None:
        if key in self._tensors or key in self._objects:
            raise ValueError(f"{key}: written twice")
        self._tensors[key] = (torch.Size(size), dtype, [])

    def write_chunk(self, key: str, offsets: tuple[int, ...], chunk: torch.Tensor) -> None:
        size, dtype, chunks = self._tensors[key]
        if chunk.dtype != dtype or len(offsets) != len(size):
            raise ValueError(f"{key}: chunk {chunk.dtype}{list(chunk.shape)} at {offsets} does not fit "
                             f"{dtype}{list(size)}")
        chunk = chunk.detach().cpu().contiguous()
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
            chunk = chunk.clone()  # torch.save writes a view's whole storage: keep only the chunk
        start = self._file.tell()
        with _no_crc32():
            torch.save(chunk, self._file)
        length = self._file.tell() - start
        chunks.append((torch.Size(offsets), chunk.shape))
        self._storage[(key, tuple(offsets))] = (start, length)
        self.bytes_written += length

    def write_object_bytes(self, key: str, raw: bytes) -> None:
        if key in self._tensors or key in self._objects:
            raise ValueError(f"{key}: written twice")
        start = self._file.tell()
        self._file.write(raw)
        self._objects.append(key)
        self._storage[(key, None)] = (start, len(raw))
        self.bytes_written += len(raw)

    def finish(self, common: dict | None = None) -> None:
        """fsync the data, then write DCP .metadata, Megatron's common.pt and metadata.json."""
        for key, (size, _, chunks) in self._tensors.items():
            covered = sum(torch.Size(sizes).numel() for _, sizes in chunks)
            if covered != size.numel():  # DCP would silently leave the gap uninitialised
                raise AssertionError(f"{key}: chunks cover {covered} of {size.numel()} elements")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        save_id = str(uuid.uuid4())
        if _emit_without_dcp():
            raw = _dump_dcp_metadata(self._tensors, self._objects, self._storage, str(self.path), save_id)
        else:
            raw = pickle.dumps(self._dcp_metadata(save_id))
        atomic_write_bytes(self.path / DCP_METADATA, raw)
        buf = io.BytesIO()
        torch.save(common or {}, buf)
        atomic_write_bytes(self.path / "common.pt", buf.getvalue())
        atomic_write_json(self.path / "metadata.json", MEGATRON_METADATA)
        fsync_dir(self.path)

    def _dcp_metadata(self, save_id: str):
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
                            storage_meta=StorageMeta(checkpoint_id=str(self.path), save_id=save_id))
        metadata.version = CURRENT_DCP_VERSION
        return metadata

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


def iter_files(path: str | os.PathLike) -> Iterator[Path]:
    """Every regular file of a checkpoint folder (for read-speed measurements, checksums)."""
    return (p for p in sorted(Path(path).rglob("*")) if p.is_file())
