"""Which implementation of the three streaming primitives runs: compiled or reference.

The compiled modules are optional (setup.py builds them when it can): `megatron_btm._mixing_cpu`
(C++/OpenMP) and `megatron_btm._mixing_cuda` (CUDA kernels, built only against a CUDA torch).
Set BTM_OPS_BACKEND=torch-reference to force the pure-PyTorch path (tests compare the two).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from megatron_btm.ops import reference

BACKENDS = ("cpp-openmp", "cuda", "torch-reference")
_modules: dict[str, ModuleType | None] = {}
_import_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"megatron_btm.{name}")
        except ImportError as e:  # not built (or built against another torch): fall back
            _modules[name] = None
            _import_errors[name] = str(e)
    return _modules[name]


def _forced() -> str | None:
    forced = os.environ.get("BTM_OPS_BACKEND")
    if forced and forced not in BACKENDS:
        raise ValueError(f"BTM_OPS_BACKEND={forced!r} is not a backend; valid: {list(BACKENDS)}")
    return forced or None


def backend(device: str | torch.device | None = None) -> str:
    """The implementation that mixing ops on `device` use: "cpp-openmp" (CPU extension), "cuda"
    (CUDA extension) or "torch-reference" (pure PyTorch fallback). Default device: the current
    CUDA device when one is available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device).type
    forced = _forced()
    if forced == "torch-reference":
        return forced
    if dev == "cpu" and _load("_mixing_cpu") is not None:
        return "cpp-openmp"
    if dev == "cuda" and _load("_mixing_cuda") is not None:
        return "cuda"
    return "torch-reference"


def import_errors() -> dict[str, str]:
    """Why each compiled module failed to import (for `btm` diagnostics)."""
    return dict(_import_errors)


def _impl(logits_KNV: torch.Tensor) -> ModuleType:
    name = backend(logits_KNV.device)
    if name == "cpp-openmp":
        return _load("_mixing_cpu")
    if name == "cuda" and logits_KNV.dtype != torch.float64:  # fp64 CUDA: reference
        return _load("_mixing_cuda")
    return reference


def stats(logits_KNV, targets_N, vocab_start: int, ignore_index: int):
    return _impl(logits_KNV).stats(logits_KNV.contiguous(), targets_N.contiguous(),
                                   vocab_start, ignore_index)


def grad_logits(logits_KNV, shift_KN, logsum_KN, coef_KN, targets_N, vocab_start: int,
                ignore_index: int):
    return _impl(logits_KNV).grad_logits(logits_KNV.contiguous(), shift_KN.contiguous(),
                                         logsum_KN.contiguous(), coef_KN.contiguous(),
                                         targets_N.contiguous(), vocab_start, ignore_index)


def logprobs(logits_KNV, shift_KN, b_KN):
    return _impl(logits_KNV).logprobs(logits_KNV.contiguous(), shift_KN.contiguous(),
                                      b_KN.contiguous())
