"""Process groups and model-parallel layout: the one ordered place where parallelism is set up.

Order: device binding (`device.bind`) → torch.distributed (gloo on CPU, nccl on GPU) →
megatron-core version guard (CPU and GPU) → CPU backend (if no CUDA) → Megatron
model-parallel groups (TP, PP; DP is what remains) → RNG seeds.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    """How one training job splits its ranks."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    virtual_pp: int | None = None
    """Interleaved pipeline chunks per rank (None: not interleaved)."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism (needs tp > 1). None: on with tp > 1 for a
    mixture-of-experts model (Megatron's MoELayer trains at TP > 1 only with it) and for
    any model with CUDA + Transformer Engine; off otherwise."""
    use_distributed_optimizer: bool | None = None
    """Shard optimizer state over data-parallel ranks. None: on with CUDA and DP > 1."""
    overlap_grad_reduce: bool | None = None
    """Overlap the gradient all-reduce / reduce-scatter with the backward pass. None: on with
    CUDA and DP > 1."""
    overlap_param_gather: bool | None = None
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass.
    None: on with CUDA, DP > 1 and the distributed optimizer."""

    def __post_init__(self):
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)}: must be >= 1")
        if self.virtual_pp is not None and (self.virtual_pp < 2 or self.pp < 2):
            raise ValueError(f"parallel.virtual_pp={self.virtual_pp}: needs pp >= 2 and virtual_pp >= 2")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp >= 2")
        if self.overlap_param_gather and self.use_distributed_optimizer is False:
            raise ValueError("parallel.overlap_param_gather=true needs "
                             "parallel.use_distributed_optimizer=true (or null)")

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % (self.tp * self.pp):
            raise ValueError(f"world size {world_size} is not divisible by tp×pp = "
                             f"{self.tp}×{self.pp}")
        return world_size // (self.tp * self.pp)


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(init_method: str | None = None, rank: int | None = None,
                     world_size: int | None = None, timeout_s: int = 600) -> tuple[int, int]:
    """Initialise torch.distributed once (world size 1 is fine: checkpointing needs a group)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    from megatron_btm.megatron import device
    env_rank, env_world, _ = env_rank_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    backend = device.backend()
    device.bind()
    if init_method is None:
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            import tempfile
            init_method = f"file://{tempfile.mkstemp(prefix='btm-dist-')[1]}"
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            init_method = "env://"
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank,
                                         world_size=world_size,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world_size


def setup_model_parallel(parallel: ParallelConfig) -> None:
    """(Re-)create Megatron's TP/PP/DP groups; activates the CPU backend when CUDA is absent."""
    from megatron.core import parallel_state

    from megatron_btm.megatron import cpu_backend
    # the guard runs on GPUs too: checkpoint.py relies on the distributed optimizer's internals
    cpu_backend.check_version()
    cpu_backend.activate()
    world = torch.distributed.get_world_size()
    parallel.data_parallel_size(world)  # validates divisibility with a clear error
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # experts are never tensor-parallel (model.to_transformer_config sets
    # expert_tensor_parallel_size=1; a dense model has no expert groups to use)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp, expert_tensor_parallel_size=1)


def seed_all(seed: int) -> None:
    """Seed so that initial weights depend on `seed` only, the same on every TP rank.

    Megatron's TP tracker derives per-TP-rank streams (for dropout inside TP regions) from it.
    """
    import random

    import numpy as np
    from megatron.core import tensor_parallel
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
