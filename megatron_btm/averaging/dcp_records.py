"""One DCP chunk record (a `torch.save` zip inside a .distcp file) read straight into its place.

`read_record_into` reads a plain contiguous tensor record with one `readinto` into the
destination tensor; anything else returns False and the caller goes through `torch.load` of a
`FileSlice`. `no_crc32` makes `torch.save` skip its CRC32 pass when writing records.
"""
from __future__ import annotations

import contextlib
import io
import re
import struct
import sys
import zipfile

import torch


class FileSlice(io.RawIOBase):
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


def read_record_into(f, offset: int, length: int, target: torch.Tensor, layouts: dict) -> bool:
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
    record = FileSlice(f, offset, length)
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
def no_crc32():
    """torch.save without its CRC32 pass (3x faster writes; nothing reading DCP checks it,
    and the forest records sha256 of every file)."""
    from torch.utils.serialization import config
    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = old
