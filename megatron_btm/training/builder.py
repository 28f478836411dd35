"""Model chunks → device → Float16Module → DDP → optimizer → LR schedule, as Megatron-LM does.

The order is Megatron-LM's `get_model` + `setup_model_and_optimizer` + `train()` wiring:
each GPTModel chunk is moved to `device.current()` (`get_model`'s `.cuda()`), wrapped in
Megatron's `Float16Module` for bf16/fp16 (which casts the fp32 learned position embedding and
every other parameter, the first stage's inputs, and the last stage's output back to fp32),
then in Megatron's DDP; the mixed-precision optimizer keeps fp32 main parameters, and
`config.grad_scale_func = optimizer.scale_loss` makes the schedule scale the loss before
backward (dynamic loss scaling for fp16; a factor of one for bf16/fp32).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from megatron_btm.megatron import device, parallel
from megatron_btm.training.config import TrainConfig


def resolve_choices(cfg: TrainConfig) -> dict[str, Any]:
    """This run's device-dependent choices (needs the model-parallel groups)."""
    from megatron.core import parallel_state as ps

    from megatron_btm.megatron.specs import have_transformer_engine
    p = cfg.parallel
    return device.training_choices(
        dtype=cfg.dtype, tp=p.tp, dp=ps.get_data_parallel_world_size(),
        use_te=have_transformer_engine(), distributed_optimizer=p.use_distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=p.overlap_param_gather,
        sequence_parallel=_sequence_parallel(cfg))


def _sequence_parallel(cfg: TrainConfig) -> bool | None:
    """The config's choice; None (the device default) becomes True for MoE at TP > 1, which
    Megatron's MoELayer trains only with sequence parallelism. Checked: SP splits the sequence
    over the TP ranks."""
    p, model = cfg.parallel, cfg.model
    sp = p.sequence_parallel
    if model.num_moe_experts and p.tp > 1:
        if sp is False:
            raise ValueError("parallel.sequence_parallel=false: Megatron-Core trains a "
                             "mixture-of-experts model at parallel.tp > 1 only with sequence "
                             "parallelism (set it true or null)")
        sp = True
    if sp and model.seq_length % p.tp:
        raise ValueError(f"model.seq_length={model.seq_length} must be divisible by "
                         f"parallel.tp={p.tp} with sequence parallelism")
    return sp


def build(cfg: TrainConfig, choices: dict[str, Any], trainable: Callable[[str], bool] | None = None):
    """Model chunks (DDP-wrapped, on this rank's device), optimizer, scheduler.

    `trainable(name)` (a GPTModel parameter name, e.g. `decoder.layers.0.mlp.router.weight`)
    False freezes that parameter before DDP and the optimizer are built: it gets no gradient
    buffer and no optimizer state, so the step never changes it."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    from megatron_btm.megatron.model import build_model, to_transformer_config

    p, dtype = cfg.parallel, device.TORCH_DTYPES[choices["dtype"]]
    dist_opt = choices["use_distributed_optimizer"]
    tconfig = to_transformer_config(
        cfg.model, tp=p.tp, pp=p.pp, dtype=dtype, recompute=cfg.recompute,
        sequence_parallel=choices["sequence_parallel"],
        virtual_pipeline_model_parallel_size=p.virtual_pp,
        # batched p2p with interleaving gives wrong losses upstream (Megatron-LM issue #750)
        batch_p2p_comm=not p.virtual_pp, **choices["fusions"])
    parallel.seed_all(cfg.model.init_seed)
    dev = device.current()
    chunks = []
    for vp_stage in range(p.virtual_pp or 1):
        vp = vp_stage if p.virtual_pp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        model = build_model(cfg.model, tp=p.tp, pp=p.pp, dtype=dtype, transformer_config=tconfig,
                            pre_process=pre, post_process=post, vp_stage=vp).to(dev)
        _mark_replicated_experts(model, tconfig)
        if trainable is not None:
            _freeze(model, trainable)
        if choices["dtype"] in device.HALF:
            model = Float16Module(tconfig, model)
        chunks.append(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt,
        overlap_grad_reduce=choices["overlap_grad_reduce"],
        overlap_param_gather=choices["overlap_param_gather"])
    chunks = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=m,
                                      disable_bucketing=i > 0) for i, m in enumerate(chunks)]
    o = cfg.optim
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        initial_loss_scale=o.initial_loss_scale, use_distributed_optimizer=dist_opt), chunks)
    _wire(tconfig, chunks, optimizer, choices)
    decay_steps = max(cfg.steps - o.warmup_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=o.warmup_steps + decay_steps,
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=cfg.steps, wd_incr_style="constant",
        # the config's schedule wins on resume: a change of steps is refused unless allowed
        # (stages/run_checks.py), and then the schedule is re-planned for the new length
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
    return chunks, optimizer, scheduler


def _freeze(model, trainable: Callable[[str], bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(bool(trainable(name)))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameter left: the freeze selects every parameter")


def _mark_replicated_experts(model, tconfig) -> None:
    """Megatron's DDP sums an expert's gradient over the expert-data-parallel group only for an
    expert-parallel model (EP > 1 sets `allreduce=False`); otherwise over the data-parallel
    group. At TP > 1 with EP = 1 and experts that are not tensor-parallel (ETP = 1, as
    model.to_transformer_config sets), every TP rank holds every expert and routes its own
    sequence slice (sequence parallelism), so the gradient must also be summed over the TP
    ranks: the expert-data-parallel group (DP × TP) does that, and the optimizer then treats
    them as the expert parameters they are. Two marks of the experts' fc2 bias (a
    RowParallelLinear bias) are then wrong: `sequence_parallel`, which would all-reduce it over
    TP a second time (finalize_model_grads), is cleared; and, not being `tensor_model_parallel`,
    the expert optimizer (whose grad-norm group is each rank alone) would count it in the grad
    norm on TP rank 0 only, so the ranks would clip differently: it is marked."""
    c = tconfig
    if not c.num_moe_experts or c.expert_model_parallel_size > 1 or \
            (c.expert_tensor_parallel_size or c.tensor_model_parallel_size) >= c.tensor_model_parallel_size:
        return
    for name, param in model.named_parameters():
        if ".mlp.experts." in f".{name}":
            param.allreduce = False
            param.sequence_parallel = False
            param.tensor_model_parallel = True


def _wire(tconfig, chunks, optimizer, choices) -> None:
    """The config hooks Megatron-LM's train() sets before the first step."""
    from megatron.core.distributed import finalize_model_grads

    def one_or_list(fns):
        return fns[0] if len(fns) == 1 else fns
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.finalize_model_grads_func = finalize_model_grads
    if choices["overlap_grad_reduce"]:
        tconfig.no_sync_func = one_or_list([m.no_sync for m in chunks])
        tconfig.grad_sync_func = one_or_list([m.start_grad_sync for m in chunks])


@contextlib.contextmanager
def params_synced(chunks, choices: dict[str, Any]):
    """Parameters fully gathered (and no gather hooks) for evaluation and checkpoint saving,
    as Megatron-LM does around both when the parameter all-gather overlaps the forward."""
    overlapped = choices["overlap_param_gather"] and choices["use_distributed_optimizer"]
    if overlapped:
        for m in chunks:
            m.disable_forward_pre_hook()
    try:
        yield
    finally:
        if overlapped:
            for m in chunks:
                m.enable_forward_pre_hook()
