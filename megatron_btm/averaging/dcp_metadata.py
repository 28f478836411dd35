"""DCP's `.metadata` read and written without importing `torch.distributed.checkpoint`.

Importing DCP costs ~0.7 s (DTensor, sympy), a tenth of a whole 8-expert average. Reading
unpickles `.metadata` with stand-in classes that keep DCP's field names (`read_metadata`; DCP's
own unpickler is the fallback when that fails); writing pickles it under DCP's class names
(`dump_metadata`, for the torch versions it was checked against; torch_dist uses DCP's own
classes otherwise).
"""
from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

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


class LightUnpickler(pickle.Unpickler):
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


def entry_kind(md: object) -> str:
    """'tensor', 'bytes' or '' for a state_dict_metadata entry (stand-in or DCP's own class)."""
    return {"TensorStorageMetadata": "tensor", "BytesStorageMetadata": "bytes"}.get(type(md).__name__, "")


def read_metadata(path: Path) -> Any:
    """DCP `Metadata` of `path/.metadata`: stand-ins first, DCP's own classes as the fallback."""
    raw = (path / DCP_METADATA).read_bytes()
    try:
        md = LightUnpickler(io.BytesIO(raw)).load()
        # every field the reader uses must be there (AttributeError otherwise: fall back)
        _ = [(i.fqn, i.offset, s.relative_path, s.offset, s.length) for i, s in md.storage_data.items()]
        _ = [(v.size, v.properties.dtype, [(c.offsets, c.sizes) for c in v.chunks])
             for v in md.state_dict_metadata.values() if entry_kind(v) == "tensor"]
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
# The pickler is hf.torch_format's (the torch-free import writer's): one copy of the layout.
_EMIT_TORCH = ("2.13.",)


def emit_without_dcp() -> bool:
    return torch.__version__.startswith(_EMIT_TORCH) and _DCP_PACKAGE not in sys.modules


def dump_metadata(tensors: dict, objects: list, storage: dict, checkpoint_id: str, save_id: str) -> bytes:
    """`.metadata` of TorchDistWriter's `tensors` (key -> torch.Size, torch.dtype, [(offsets,
    sizes)]), `objects` and `storage`, as `torch_format.dcp_metadata` of their plain values."""
    from megatron_btm.hf import torch_format
    plain = {key: (tuple(size), str(dtype).removeprefix("torch."),
                   [(tuple(o), tuple(s)) for o, s in chunks])
             for key, (size, dtype, chunks) in tensors.items()}
    return torch_format.dcp_metadata(plain, objects, storage, DATA_FILE, checkpoint_id, save_id)
