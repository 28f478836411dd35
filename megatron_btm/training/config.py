"""Training run config: model + parallel layout + optimizer + schedule + logging.

Loaded from YAML (`TrainConfig.from_yaml`), overridable with `key.sub=value` strings (the CLI's
`--set`), validated once at construction with errors that name the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btm.megatron.model import GPTConfig
from megatron_btm.megatron.parallel import ParallelConfig
from megatron_btm.utils.config import apply_overrides, check_fields, load_yaml
from megatron_btm.utils.config import from_dict as _from_dict
from megatron_btm.utils.dtypes import DTYPE_NAMES

DECAY_STYLES = ("cosine", "linear", "constant")
DTYPES = ("auto", *DTYPE_NAMES)   # auto: bf16 with CUDA, fp32 without


@dataclass(kw_only=True)
class OptimConfig:
    """Adam with warmup + decay (Megatron's optimizer and OptimizerParamScheduler)."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_style: str = "cosine"
    """LR decay after warmup: cosine, linear or constant."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    initial_loss_scale: float = 2.0 ** 32
    """fp16 only: starting value of Megatron's dynamic loss scale (halved after each overflow
    past the hysteresis of 2, doubled after 1000 clean steps)."""

    def __post_init__(self):
        check_fields(self, "optim")
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"optim.decay_style={self.decay_style!r}: valid values are {DECAY_STYLES}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if not self.initial_loss_scale >= 1.0:
            raise ValueError(f"optim.initial_loss_scale={self.initial_loss_scale}: must be >= 1")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one training job needs besides its data and output folder."""

    model: GPTConfig = field(default_factory=GPTConfig)
    """Architecture (see GPTConfig)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP layout; DP is world_size / (tp·pp)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step (a multiple of micro_batch_size × DP; the rest is accumulation)."""
    seed: int = 1234
    """Seed of data order and dropout (model init uses model.init_seed)."""
    dtype: str = "auto"
    """Parameter dtype: auto (bf16 with CUDA, fp32 without), fp32, bf16 or fp16 (dynamic loss
    scaling). bf16/fp16 run through Megatron's Float16Module and mixed-precision optimizer
    (fp32 main parameters and gradients)."""
    recompute: bool = False
    """Full activation recompute (saves memory, costs one extra forward)."""
    eval_interval: int = 50
    """Validate every N steps (0: only at the end)."""
    eval_iters: int = 4
    """Validation batches per domain."""
    save_interval: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints to keep (older ones are deleted)."""
    log_interval: int = 1
    """Log training loss every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <output>/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (set WANDB_MODE=offline on clusters without internet)."""
    wandb_project: str = "megatron-btm"
    """W&B project name."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    num_threads: int | None = None
    """torch intra-op threads per process on CPU (None: torch's default)."""

    def __post_init__(self):
        check_fields(self, "config")
        if isinstance(self.model, dict):
            self.model = GPTConfig.from_dict(self.model)
        if isinstance(self.parallel, dict):
            self.parallel = _from_dict(ParallelConfig, self.parallel, "parallel")
        if isinstance(self.optim, dict):
            self.optim = _from_dict(OptimConfig, self.optim, "optim")
        for name in ("steps", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size={self.global_batch_size} must be a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: valid values are {DTYPES}")
        for name in ("eval_interval", "save_interval", "eval_iters", "keep_checkpoints", "log_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.parallel.virtual_pp and self.model.num_layers % (self.parallel.pp * self.parallel.virtual_pp):
            raise ValueError(f"model.num_layers={self.model.num_layers} must be divisible by "
                             f"pp×virtual_pp={self.parallel.pp * self.parallel.virtual_pp}")
        if self.model.num_layers % self.parallel.pp:
            raise ValueError(f"model.num_layers={self.model.num_layers} must be divisible by "
                             f"parallel.pp={self.parallel.pp}")

    def num_microbatches(self, dp: int) -> int:
        per_rank = self.micro_batch_size * dp
        if self.global_batch_size % per_rank:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of "
                             f"micro_batch_size×DP = {self.micro_batch_size}×{dp}")
        return self.global_batch_size // per_rank

    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.model.seq_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TrainConfig":
        data: dict[str, Any] = {}
        if path is not None:
            data = load_yaml(path)
            data = data.get("train", data)  # a plan or experiment file may nest it under `train`
        apply_overrides(data, overrides)
        return cls.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML, 1e-3 a float) to a nested dict in place."""
    apply_overrides(data, [item])
