"""Read a Hugging Face model folder's weights one tensor at a time.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), and
`pytorch_model.bin` (+ its sharded index) through `torch.load(weights_only=True, mmap=True)`
only: a pickle holding anything but tensors is refused, never executed. Safetensors shapes come
from the file headers, so a whole import is checked before any tensor is read.

Safetensors files are read with plain `readinto` at the header's offsets (the format is an
8-byte header length, a JSON header, then raw little-endian bytes), not through a memory map:
pages of a mapping stay in the process's resident set, so reading a whole model through one
would make the importer's footprint the model's size instead of one tensor's. Reading
safetensors does not import torch (`read_rows_into` fills any writable buffer; `get` makes a
torch tensor); a pytorch_model.bin does.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path

SAFETENSORS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


# safetensors dtype -> (torch dtype, torch's storage class of it, element size)
ST_DTYPES = {"F64": ("float64", "DoubleStorage", 8), "F32": ("float32", "FloatStorage", 4),
             "F16": ("float16", "HalfStorage", 2), "BF16": ("bfloat16", "BFloat16Storage", 2),
             "I64": ("int64", "LongStorage", 8), "I32": ("int32", "IntStorage", 4),
             "I16": ("int16", "ShortStorage", 2), "I8": ("int8", "CharStorage", 1),
             "U8": ("uint8", "ByteStorage", 1), "BOOL": ("bool", "BoolStorage", 1)}


def _torch_dtype(name: str):
    import torch
    return getattr(torch, ST_DTYPES[name][0])


class SafetensorsFile:
    """One .safetensors file: header parsed and checked at open, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.base = 8 + n
            for key, e in header.items():
                itemsize = ST_DTYPES[e["dtype"]][2]
                begin, end = e["data_offsets"]
                numel = 1
                for d in e["shape"]:
                    numel *= d
                if end - begin != numel * itemsize or self.base + end > size:
                    raise ValueError(f"tensor {key!r}: data_offsets {e['data_offsets']} do not fit "
                                     f"{e['dtype']}{e['shape']} in a file of {size} bytes")
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        self.header = header
        self._f = open(path, "rb", buffering=0)  # readinto straight into the tensor

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str):
        return _torch_dtype(self.header[key]["dtype"])

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype ("F32", "BF16", ...; see ST_DTYPES)."""
        return self.header[key]["dtype"]

    def row_bytes(self, key: str) -> int:
        e = self.header[key]
        return (e["data_offsets"][1] - e["data_offsets"][0]) // max(e["shape"][0] if e["shape"] else 1, 1)

    def get(self, key: str, start: int = 0, stop: int | None = None, out=None):
        """The tensor, or its rows [start, stop) (read alone: a slice of a large embedding), read
        straight into `out` when given (contiguous, of that dtype and those rows' shape)."""
        import torch
        shape = list(self.header[key]["shape"])
        stop = (shape[0] if shape else 1) if stop is None else stop
        if shape:
            shape[0] = stop - start
        dtype = self.dtype(key)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif list(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"{key}: out is {out.dtype}{list(out.shape)}, need contiguous "
                             f"{dtype}{shape}")
        if out.numel():
            self.read_rows_into(key, start, stop, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def read_rows_into(self, key: str, start: int, stop: int, buf: memoryview) -> None:
        """Rows [start, stop) of `key` as raw little-endian bytes into `buf` (exactly that size)."""
        e = self.header[key]
        if len(buf) != (stop - start) * self.row_bytes(key):
            raise ValueError(f"{key}: buffer of {len(buf)} bytes for rows [{start}, {stop})")
        if sys.byteorder != "little":
            raise ValueError(f"{self.path}: reading safetensors needs a little-endian machine")
        self._f.seek(self.base + e["data_offsets"][0] + start * self.row_bytes(key))
        done = 0
        while done < len(buf):
            got = self._f.readinto(buf[done:])
            if not got:
                raise ValueError(f"{self.path}: truncated while reading {key!r}")
            done += got


def _index(folder: Path, name: str) -> dict[str, str]:
    path = folder / name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a weight index (expected {{'weight_map': {{key: file}}}}): {e}") from None
    for file in sorted(set(weight_map.values())):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file}: shard named by {path} is missing")
    return weight_map


class HFWeights:
    """{key: tensor} view of a model folder; `shape(key)` without reading, `get(key)` reads one."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if (self.folder / SAFE_INDEX).is_file():
            self._files = _index(self.folder, SAFE_INDEX)
        elif (self.folder / SAFETENSORS).is_file():
            self._files = None
        elif (self.folder / BIN_INDEX).is_file():
            self._files = _index(self.folder, BIN_INDEX)
        elif (self.folder / BIN).is_file():
            self._files = None
        else:
            raise FileNotFoundError(f"{self.folder}: no weights ({SAFETENSORS}, {SAFE_INDEX}, {BIN} "
                                    f"or {BIN_INDEX})")
        self.safetensors = (self.folder / SAFE_INDEX).is_file() or (self.folder / SAFETENSORS).is_file()
        default = SAFETENSORS if self.safetensors else BIN
        names = sorted(set(self._files.values())) if self._files is not None else [default]
        self._open = {name: self._load(self.folder / name) for name in names}
        self._where = {k: name for name, handle in self._open.items() for k in self._keys(handle)}

    def _load(self, path: Path):
        if self.safetensors:
            return SafetensorsFile(path)
        import torch
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: holds objects other than tensors; refusing to unpickle them "
                             f"(torch.load weights_only=True: {first})") from None
        except RuntimeError as e:
            raise ValueError(f"{path}: not a readable torch checkpoint: {e}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{path}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a "
                             f"tensor (expected a state dict of tensors)")
        return state

    def _keys(self, handle) -> list[str]:
        return list(handle.keys())

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._open[self._where[key]]
        return handle.shape(key) if self.safetensors else tuple(handle[key].shape)

    def get(self, key: str):
        handle = self._open[self._where[key]]
        return handle.get(key) if self.safetensors else handle[key]

    def dtype(self, key: str):
        handle = self._open[self._where[key]]
        return handle.dtype(key) if self.safetensors else handle[key].dtype

    def get_rows(self, key: str, start: int, stop: int, out=None):
        """Rows [start, stop) of a tensor, without reading the rest; into `out` if given."""
        handle = self._open[self._where[key]]
        if self.safetensors:
            return handle.get(key, start, stop, out)
        rows = handle[key][start:stop]
        return rows.clone() if out is None else out.copy_(rows)

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype name of `key` (safetensors folders only)."""
        return self._open[self._where[key]].dtype_name(key)

    def read_rows_into(self, key: str, start: int, stop: int, buf: memoryview) -> None:
        """Rows [start, stop) of `key`'s raw bytes into `buf` (safetensors folders only)."""
        self._open[self._where[key]].read_rows_into(key, start, stop, buf)

    def row_bytes(self, key: str) -> int:
        return self._open[self._where[key]].row_bytes(key)

    def file_of(self, key: str) -> Path:
        return self.folder / self._where[key]
