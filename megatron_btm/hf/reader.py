"""Read a Hugging Face model folder's weights one tensor at a time.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), and
`pytorch_model.bin` (+ its sharded index) through `torch.load(weights_only=True, mmap=True)`
only: a pickle holding anything but tensors is refused, never executed. Safetensors shapes come
from the file headers, so a whole import is checked before any tensor is read.

Safetensors files are read with plain `readinto` at the header's offsets (the format is an
8-byte header length, a JSON header, then raw little-endian bytes), not through a memory map:
pages of a mapping stay in the process's resident set, so reading a whole model through one
would make the importer's footprint the model's size instead of one tensor's.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path

import torch

SAFETENSORS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


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
                dtype = _ST_DTYPES[e["dtype"]]
                begin, end = e["data_offsets"]
                numel = 1
                for d in e["shape"]:
                    numel *= d
                if end - begin != numel * dtype.itemsize or self.base + end > size:
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

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self.header[key]["dtype"]]

    def get(self, key: str, start: int = 0, stop: int | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or its rows [start, stop) (read alone: a slice of a large embedding), read
        straight into `out` when given (contiguous, of that dtype and those rows' shape)."""
        e = self.header[key]
        shape = list(e["shape"])
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        row_bytes = (e["data_offsets"][1] - e["data_offsets"][0]) // max(rows, 1)
        if shape:
            shape[0] = stop - start
        if out is None:
            out = torch.empty(shape, dtype=_ST_DTYPES[e["dtype"]])
        elif list(out.shape) != shape or out.dtype != _ST_DTYPES[e["dtype"]] or not out.is_contiguous():
            raise ValueError(f"{key}: out is {out.dtype}{list(out.shape)}, need contiguous "
                             f"{_ST_DTYPES[e['dtype']]}{shape}")
        if out.numel():
            if sys.byteorder != "little":
                raise ValueError(f"{self.path}: reading safetensors needs a little-endian machine")
            self._f.seek(self.base + e["data_offsets"][0] + start * row_bytes)
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(buf):
                got = self._f.readinto(buf[done:])
                if not got:
                    raise ValueError(f"{self.path}: truncated while reading {key!r}")
                done += got
        return out


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

    def get(self, key: str) -> torch.Tensor:
        handle = self._open[self._where[key]]
        return handle.get(key) if self.safetensors else handle[key]

    def dtype(self, key: str) -> torch.dtype:
        handle = self._open[self._where[key]]
        return handle.dtype(key) if self.safetensors else handle[key].dtype

    def get_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, without reading the rest; into `out` if given."""
        handle = self._open[self._where[key]]
        if self.safetensors:
            return handle.get(key, start, stop, out)
        rows = handle[key][start:stop]
        return rows.clone() if out is None else out.copy_(rows)

    def file_of(self, key: str) -> Path:
        return self.folder / self._where[key]
