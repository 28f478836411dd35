"""`torch.save` records and DCP's `.metadata`, written without importing torch.

What torch 2.13 writes, reproduced byte for byte (tests/hf/test_import_torchfree.py compares):

- A `torch.save` record is an uncompressed zip (PyTorchStreamWriter over miniz): members
  `archive/data.pkl` (pickle protocol 2), `.format_version` "1", `.storage_alignment` "64",
  `byteorder` "little", `data/<n>` (one per storage, raw bytes), `version` "3\\n" and
  `.data/serialization_id`. Each local header has flags 0x0808 (sizes and CRC follow in a data
  descriptor), zero time/date/sizes, and an extra field "FB" + length + "Z" padding that puts
  the member's bytes at a multiple of 64 from the record's start; a central directory, zip64
  end record and locator, and end record close it. The serialization id is 20 digits of a
  hash of the member names (libstdc++ `std::hash` combined by `c10::hash_combine`, over the
  names' unordered_set) and 20 of the member CRCs combined the same way.
- A tensor's data.pkl is `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
  OrderedDict())`, the storage a persistent id ('storage', torch.<T>Storage, '0', 'cpu', numel).
- Torch classes and dtypes are pickled as GLOBAL opcodes naming them (`Named` stand-ins), so the
  loader builds torch's own objects; `pickle._Pickler` (the Python pickler) lets `save_global`
  be overridden and writes what the C pickler writes at protocol 2.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zlib
from typing import Any

ALIGNMENT = 64
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_DESCRIPTOR = struct.Struct("<IIII")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_FLAGS = 0x0808
_ZIP32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def _std_hash(data: bytes, seed: int = 0xC70F6907) -> int:
    """libstdc++'s `std::hash<std::string>` (_Hash_bytes, 64-bit)."""
    mul = (0xC6A4A793 << 32) + 0x5BD1E995
    shift = lambda v: v ^ (v >> 47)  # noqa: E731
    n, aligned = len(data), len(data) & ~7
    h = (seed ^ (n * mul)) & _M64
    for i in range(0, aligned, 8):
        h = ((h ^ (shift(int.from_bytes(data[i:i + 8], "little") * mul & _M64) * mul & _M64)) * mul) & _M64
    if n & 7:
        h = ((h ^ int.from_bytes(data[aligned:], "little")) * mul) & _M64
    return shift(shift(h) * mul & _M64)


def _hash_combine(seed: int, value: int) -> int:
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _M64)) & _M64


class ZipRecord:
    """Writes one `torch.save` record to `f` (a binary file at any position) member by member;
    `close()` writes the serialization id and the directory and returns the record's length."""

    def __init__(self, f, *, crc32: bool, archive: str = "archive"):
        self._f, self._crc32, self._archive = f, crc32, archive
        self._start = f.tell()
        self._entries: list[tuple[bytes, int, int, int]] = []  # name, offset, crc, size
        self._names: list[str] = []

    def add(self, name: str, data) -> None:
        full = f"{self._archive}/{name}".encode()
        data = memoryview(data).cast("B")
        offset = self._f.tell() - self._start
        if len(data) >= _ZIP32 or offset >= _ZIP32:
            raise ValueError(f"{name}: a record member of 4 GiB or more needs zip64 fields")
        pad = -(offset + _LOCAL.size + len(full) + 4) % ALIGNMENT
        crc = zlib.crc32(data) if self._crc32 else 0
        self._f.write(_LOCAL.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(full), 4 + pad))
        self._f.write(full + b"FB" + struct.pack("<H", pad) + b"Z" * pad)
        self._f.write(data)
        self._f.write(_DESCRIPTOR.pack(0x08074B50, crc, len(data), len(data)))
        self._entries.append((full, offset, crc, len(data)))
        if name != ".data/serialization_id":
            self._names.append(name)

    def close(self) -> int:
        names, crcs = 0, 0
        for name in reversed(self._names):  # the unordered_set's iteration order (checked)
            names = _hash_combine(names, _std_hash(name.encode()))
        for _, _, crc, _ in self._entries:
            crcs = _hash_combine(crcs, crc)
        self.add(".data/serialization_id", f"{names:020d}{crcs:020d}".encode())
        cd_start = self._f.tell() - self._start
        for full, offset, crc, size in self._entries:
            self._f.write(_CENTRAL.pack(0x02014B50, 0, 0, _FLAGS, 0, 0, 0, crc, size, size,
                                        len(full), 0, 0, 0, 0, 0, offset) + full)
        end64 = self._f.tell() - self._start
        n, cd_size = len(self._entries), end64 - cd_start
        self._f.write(_END64.pack(0x06064B50, _END64.size - 12, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_start))
        self._f.write(_LOCATOR64.pack(0x07064B50, 0, end64, 1))
        self._f.write(_END.pack(0x06054B50, 0, 0, n, n, cd_size, cd_start, 0))
        return self._f.tell() - self._start


def _write_record(f, pickled: bytes, storages=(), *, crc32: bool) -> int:
    record = ZipRecord(f, crc32=crc32)
    record.add("data.pkl", pickled)
    record.add(".format_version", b"1")
    record.add(".storage_alignment", str(ALIGNMENT).encode())
    record.add("byteorder", b"little")
    for i, data in enumerate(storages):
        record.add(f"data/{i}", data)
    record.add("version", b"3\n")
    return record.close()


def save_bytes(obj: Any) -> bytes:
    """`torch.save(obj)` of an object without tensors (plain Python data), with CRCs."""
    buf = io.BytesIO()
    _write_record(buf, pickle.dumps(obj, protocol=2), crc32=True)
    return buf.getvalue()


# ---- GLOBAL stand-ins ---------------------------------------------------------------------------
_NAMED: dict[tuple[str, str], type] = {}


def named(module: str, name: str) -> type:
    """A class that pickles as GLOBAL `module.name` (one per name, as torch's own objects are
    singletons the pickle memo refers back to). Instances carry their pickled state in __dict__."""
    key = (module, name)
    if key not in _NAMED:
        _NAMED[key] = type(name, (), {"pickle_as": key, "__init__": _init_state})
    return _NAMED[key]


def _init_state(self, **state: Any) -> None:
    self.__dict__.update(state)


def torch_dtype(name: str) -> type:
    """torch.<name> (a dtype: torch pickles it as GLOBAL torch.<name>)."""
    return named("torch", name)


class Size:
    """torch.Size(dims), which pickles as REDUCE(torch.Size, (tuple,))."""

    def __init__(self, dims):
        self.dims = [int(d) for d in dims]

    def __reduce__(self):
        return named("torch", "Size"), (tuple(self.dims),)  # a new tuple each time, as torch's


class _Storage:
    def __init__(self, storage_class: str, numel: int):
        self.pid = ("storage", named("torch", storage_class), "0", "cpu", numel)


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, step = [], 1
        for d in reversed(self.shape):
            stride.insert(0, step)
            step *= d
        return (named("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle._Pickler):  # the Python pickler: its save_global can be overridden
    def save_global(self, obj, name=None):
        target = getattr(obj, "pickle_as", None) if isinstance(obj, type) else None
        if not target:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{target[0]}\n{target[1]}\n".encode("ascii"))
        self.memoize(obj)

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_tensor_record(f, data, storage_class: str, shape: tuple[int, ...], numel: int) -> int:
    """`torch.save` of a contiguous tensor whose bytes are `data` (no CRC: TorchDistWriter
    writes its records under `no_crc32`); returns the record's length."""
    pickled = dumps(_Tensor(_Storage(storage_class, numel), shape))
    return _write_record(f, pickled, [data], crc32=False)


# ---- DCP's .metadata ----------------------------------------------------------------------------
_DCP_MD = "torch.distributed.checkpoint.metadata"


class _TensorProperties:
    pickle_as = (_DCP_MD, "TensorProperties")

    def __init__(self, dtype: str):
        self.dtype = dtype

    def __getstate__(self):  # as DCP's TensorProperties.__getstate__
        return (torch_dtype(self.dtype), _STRIDED, False, _Enum(), False)


class _Layout:
    """A torch.layout, which pickles as REDUCE(torch.serialization._get_layout, ("torch.<name>",));
    one instance per layout, as torch's (the pickle memo refers back to it)."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return named("torch.serialization", "_get_layout"), (f"torch.{self.name}",)


_STRIDED = _Layout("strided")


class _Enum:
    """_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT: an Enum pickles as a call with its value."""

    def __reduce__(self):
        return named(_DCP_MD, "_MEM_FORMAT_ENCODING"), (0,)


def dcp_metadata(tensors: dict, objects: list, storage: dict, data_file: str, checkpoint_id: str,
                 save_id: str) -> bytes:
    """DCP's `.metadata` pickle (for both torch_dist writers; averaging.dcp_metadata.dump_metadata
    passes torch's sizes and dtypes as plain values): `tensors` key -> (size, dtype name,
    [(offsets, sizes)]), `objects` keys, `storage` (key, offsets | None) -> (offset, length) in
    `data_file`."""
    md: dict[str, Any] = {
        key: named(_DCP_MD, "TensorStorageMetadata")(
            properties=_TensorProperties(dtype), size=Size(size),
            chunks=[named(_DCP_MD, "ChunkStorageMetadata")(offsets=Size(o), sizes=Size(s)) for o, s in chunks])
        for key, (size, dtype, chunks) in tensors.items()}
    md.update({key: named(_DCP_MD, "BytesStorageMetadata")() for key in objects})
    index = {}
    for (key, offsets), (start, length) in storage.items():
        fields: dict[str, Any] = {"fqn": key, "index": None}
        if offsets is not None:
            fields["offset"] = Size(offsets)
        index[named(_DCP_MD, "MetadataIndex")(**fields)] = named(
            "torch.distributed.checkpoint.filesystem", "_StorageInfo")(
            relative_path=data_file, offset=start, length=length)
    metadata = named(_DCP_MD, "Metadata")(
        state_dict_metadata=md, planner_data=None, storage_data=index,
        storage_meta=named(_DCP_MD, "StorageMeta")(checkpoint_id=checkpoint_id, save_id=save_id,
                                                   load_id=None, modules=[]),
        version="1.0.0")
    return dumps(metadata)
