"""Building keyword-only config dataclasses from YAML/JSON mappings, with errors naming keys."""
from __future__ import annotations

import dataclasses
from typing import Any


def from_dict(cls, data: Any, where: str):
    """`cls(**data)`, refusing a non-mapping, unknown keys and missing required keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    missing = sorted(f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    return cls(**data)
