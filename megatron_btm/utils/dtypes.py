"""The parameter dtypes a user names (configs, `--dtype`), defined once.

Names only at import (no torch: the CLI parser uses them); `torch_dtype` imports torch.
"""
from __future__ import annotations

from typing import Any

DTYPE_NAMES = ("fp32", "bf16", "fp16")
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # also HF's torch_dtype


def check_dtype(name: str, key: str = "dtype") -> str:
    if name not in DTYPE_NAMES:
        raise ValueError(f"{key}={name!r}: valid values are {DTYPE_NAMES}")
    return name


def torch_dtype_name(name: str) -> str:
    """'bf16' -> 'bfloat16' (the name torch and Hugging Face configs use)."""
    return _TORCH_NAMES[check_dtype(name)]


def torch_dtype(name: str) -> Any:
    """'bf16' -> torch.bfloat16."""
    import torch
    return getattr(torch, torch_dtype_name(name))
