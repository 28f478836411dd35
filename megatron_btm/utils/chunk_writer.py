"""The bookkeeping both torch_dist writers share, without torch: `averaging.torch_dist.
TorchDistWriter` (chunks are torch tensors) and `hf.torchfree.Writer` (chunks are raw bytes). One
data file of records, the (key, offsets) -> (offset, length) storage map DCP's `.metadata` is
built from, the CRC of the content, and the deterministic save_id / checkpoint_id."""
from __future__ import annotations

import math
import os
import uuid
import zlib
from pathlib import Path

from megatron_btm.utils.io import TMP_PREFIX


class ChunkFileWriter:
    """Subclasses declare tensors and write their chunks' records; call `_close_data()` in
    `finish()` before writing the metadata files."""

    def __init__(self, path: str | os.PathLike, data_file: str):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path / data_file, "wb")
        # plain records until finish() builds DCP's Metadata from them
        self._tensors: dict[str, tuple] = {}  # key -> size, dtype, chunks [(offsets, shape)]
        self._objects: list[str] = []
        self._storage: dict[tuple, tuple[int, int]] = {}  # (key, offsets | None) -> (offset, length)
        self.bytes_written = 0
        self._crc = 0  # of every chunk's bytes and object, in order: the content's save_id

    def _check_new(self, key: str) -> None:
        if key in self._tensors or key in self._objects:
            raise ValueError(f"{key}: written twice")

    def _record(self, key: str, offsets: tuple[int, ...] | None, start: int, length: int) -> None:
        self._storage[(key, None if offsets is None else tuple(offsets))] = (start, length)
        self.bytes_written += length

    def write_object_bytes(self, key: str, raw: bytes) -> None:
        self._check_new(key)
        self._crc = zlib.crc32(raw, self._crc)
        start = self._file.tell()
        self._file.write(raw)
        self._objects.append(key)
        self._record(key, None, start, len(raw))

    def _close_data(self) -> tuple[str, str]:
        """Check every tensor is fully covered, fsync and close the data file; return
        (save_id, checkpoint_id). Deterministic, so the same content writes the same bytes
        wherever it is staged: save_id from the content, checkpoint_id = the folder's name (DCP
        records the path at save time; a staging path is stale after the rename)."""
        for key, (size, _, chunks) in self._tensors.items():
            covered = sum(math.prod(shape) for _, shape in chunks)
            if covered != math.prod(size):  # DCP would silently leave the gap uninitialised
                raise AssertionError(f"{key}: chunks cover {covered} of {math.prod(size)} elements")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        layout = repr(sorted((k, tuple(o or ()), v) for (k, o), v in self._storage.items()))
        save_id = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{self._crc:08x}:{layout}"))
        name = self.path.name
        if name.startswith(TMP_PREFIX):  # utils.io.atomic_dir's staging: .tmp-<name>.<random>
            name = name[len(TMP_PREFIX):].rsplit(".", 1)[0]
        return save_id, name

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
