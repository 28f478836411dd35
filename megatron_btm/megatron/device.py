"""The one device choice: where models, batches, reductions, evaluation and generation run.

`current()` is `cuda:<local rank>` when CUDA is present (local rank from LOCAL_RANK, else
SLURM_LOCALID, modulo the visible devices), else the CPU. Every caller uses this one function,
so the CPU run (CI) takes the same code path as the GPU run; the only CUDA-only branch is the
process-group backend (`backend()`).

`training_choices` derives the performance defaults a Megatron-LM user expects on a GPU (bf16,
fusions, distributed optimizer with overlapped communication for DP > 1, sequence parallelism
with TP > 1 on Transformer Engine, pinned-memory prefetch) from what is present; on the CPU
each is off. An explicit config value always wins over the default.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from megatron_btm.utils.dtypes import DTYPE_NAMES, torch_dtype

HALF = ("bf16", "fp16")
TORCH_DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}   # the one table: utils.dtypes


def local_rank() -> int:
    """The process's rank on its node: torchrun's LOCAL_RANK, else SLURM_LOCALID, else 0."""
    env = os.environ
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in env:
            return int(env[name])
    return 0


def cuda() -> bool:
    return torch.cuda.is_available()


def current() -> torch.device:
    """This process's device (CUDA: one per local rank; else the CPU)."""
    if cuda():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def backend() -> str:
    """torch.distributed backend for `current()`."""
    return "nccl" if cuda() else "gloo"


def bind() -> torch.device:
    """Make `current()` the current CUDA device (before NCCL init); returns it."""
    dev = current()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def resolve_dtype(name: str) -> str:
    """`auto` → bf16 with CUDA, fp32 without; other names unchanged."""
    if name == "auto":
        return "bf16" if cuda() else "fp32"
    return name


def pin(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Page-locked copies (so the host-to-device copy can be asynchronous); CUDA only."""
    if not cuda():
        return batch
    return {k: v.pin_memory() for k, v in batch.items()}


def to_device(batch: dict[str, torch.Tensor], dev: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The batch on `dev` (default `current()`); non-blocking from pinned memory."""
    dev = current() if dev is None else dev
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def training_choices(*, dtype: str, tp: int, dp: int, use_te: bool,
                     distributed_optimizer: bool | None, overlap_grad_reduce: bool | None,
                     overlap_param_gather: bool | None,
                     sequence_parallel: bool | None) -> dict[str, Any]:
    """Every device-dependent choice of a training run (printed at start, kept in meta.json).

    None means "default for this machine". Fusions are on with CUDA where the kernel exists:
    bias-GeLU and bias-dropout-add are Megatron's jit fusers (torch.compile: need Triton);
    masked softmax is Megatron's
    fused softmax; persistent layernorm and gradient-accumulation fusion need Transformer
    Engine (or apex's fused_weight_gradient_mlp_cuda for the latter); on the CPU they would
    only add torch.compile time.
    """
    on_gpu = cuda()
    jit = on_gpu and _importable("triton")  # Megatron's jit_fuser is torch.compile (Triton)
    dist_opt = (on_gpu and dp > 1) if distributed_optimizer is None else distributed_optimizer
    grad_fusion = on_gpu and (use_te or _importable("fused_weight_gradient_mlp_cuda"))
    return {
        "device": str(current()),
        "backend": backend(),
        "dtype": resolve_dtype(dtype),
        "transformer_engine": use_te,
        "fusions": {
            "bias_activation_fusion": jit,
            "bias_dropout_fusion": jit,
            "masked_softmax_fusion": on_gpu,
            "persist_layer_norm": on_gpu and use_te,
            "gradient_accumulation_fusion": grad_fusion,
        },
        "use_distributed_optimizer": bool(dist_opt),
        "overlap_grad_reduce": bool((on_gpu and dp > 1) if overlap_grad_reduce is None
                                    else overlap_grad_reduce),
        "overlap_param_gather": bool((on_gpu and dp > 1 and dist_opt) if overlap_param_gather is None
                                     else overlap_param_gather),
        "sequence_parallel": bool((on_gpu and use_te and tp > 1) if sequence_parallel is None
                                  else sequence_parallel),
        "pinned_prefetch": on_gpu,
        "tf32": on_gpu,
        "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
    }


def describe(choices: dict[str, Any]) -> str:
    """One line per choice, for the start of a run's log."""
    flat = dict(choices)
    flat.update(flat.pop("fusions", {}))
    return "\n".join(f"  {k}: {v}" for k, v in flat.items())
