"""The training loop: Megatron-Core model, DDP, optimizer and pipeline schedule.

One function, `train`, used for the seed LM and for every expert. Parallelism is composed in
one ordered block (`_build`): process groups → seeds → model chunks → DDP → optimizer →
LR schedule. Each step runs Megatron's own `get_forward_backward_func` (no pipelining,
1F1B or interleaved), then `optimizer.step()`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_btm.megatron import checkpoint as ckpt_lib
from megatron_btm.megatron import parallel
from megatron_btm.training import batches
from megatron_btm.training.config import TrainConfig
from megatron_btm.training.logger import RunLogger
from megatron_btm.utils.io import atomic_write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    step: int
    tokens: int
    losses: list[tuple[int, float]]
    valid_loss: dict[str, float]
    checkpoint: Path | None
    device_seconds: float


def _build(cfg: TrainConfig):
    """Model chunks (DDP-wrapped), optimizer, scheduler, for the current process groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_btm.megatron.model import build_model, to_transformer_config

    p, dtype = cfg.parallel, DTYPES[cfg.dtype]
    tconfig = to_transformer_config(
        cfg.model, tp=p.tp, pp=p.pp, dtype=dtype, recompute=cfg.recompute,
        sequence_parallel=p.sequence_parallel, virtual_pipeline_model_parallel_size=p.virtual_pp,
        # batched p2p with interleaving gives wrong losses upstream (Megatron-LM issue #750)
        batch_p2p_comm=not p.virtual_pp)
    parallel.seed_all(cfg.model.init_seed)
    chunks = []
    for vp_stage in range(p.virtual_pp or 1):
        vp = vp_stage if p.virtual_pp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        model = build_model(cfg.model, tp=p.tp, pp=p.pp, dtype=dtype, transformer_config=tconfig,
                            pre_process=pre, post_process=post, vp_stage=vp)
        chunks.append(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=p.use_distributed_optimizer)
    chunks = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=m,
                                      disable_bucketing=i > 0) for i, m in enumerate(chunks)]
    tconfig.finalize_model_grads_func = finalize_model_grads
    o = cfg.optim
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
        use_distributed_optimizer=p.use_distributed_optimizer), chunks)
    decay_steps = max(cfg.steps - o.warmup_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=o.warmup_steps + decay_steps,
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=cfg.steps, wd_incr_style="constant")
    return chunks, optimizer, scheduler


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return losses, partial(_masked_mean, batch["loss_mask"])


def _masked_mean(loss_mask, losses):
    mask = loss_mask.float()
    loss = (losses.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # clone: the schedule divides `loss` in place by the number of micro-batches
    return loss, {"loss": loss.detach().clone()}


def _run_schedule(chunks, microbatches, cfg: TrainConfig, forward_only: bool) -> float:
    """Forward(+backward) over the micro-batches; return the mean loss seen by every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    n = len(microbatches)
    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    out = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=n,
        seq_length=cfg.model.seq_length, micro_batch_size=cfg.micro_batch_size,
        forward_only=forward_only)
    # losses live on the last pipeline stage: sum there, all-reduce over the world, divide by
    # the number of ranks that contributed (each TP rank of each DP replica on the last stage)
    local = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and out:
        local[0] = sum(float(d["loss"]) for d in out) / len(out)
        local[1] = 1.0
    torch.distributed.all_reduce(local)
    return float(local[0] / local[1]) if local[1] > 0 else float("nan")


def evaluate(chunks, valid_datasets: dict[str, Any], cfg: TrainConfig) -> dict[str, float]:
    from megatron.core import parallel_state as ps
    for m in chunks:
        m.eval()
    results = {}
    with torch.no_grad():
        for domain, dataset in valid_datasets.items():
            mbs = batches.eval_microbatches(
                dataset, iters=cfg.eval_iters, micro_batch_size=cfg.micro_batch_size,
                dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())
            if mbs:
                results[domain] = _run_schedule(chunks, mbs, cfg, forward_only=True)
    for m in chunks:
        m.train()
    return results


def train(cfg: TrainConfig, *, train_dataset, valid_datasets: dict[str, Any] | None,
          output_dir: str | Path, init_from: str | Path | None = None, resume: str = "auto",
          run_meta: dict[str, Any] | None = None, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) one LM. Needs torch.distributed initialised (`parallel.init_distributed`).

    resume="auto": continue from output_dir's latest complete checkpoint if there is one, else
    start from `init_from` weights (a branch) or from random init. resume="none": start fresh;
    refuses an output folder that already holds checkpoints. `stop_after` ends the run early
    after that many steps (for tests/benchmarks), without changing the LR schedule.
    """
    from megatron.core import parallel_state as ps
    if resume not in ("auto", "none"):
        raise ValueError(f"resume={resume!r}: valid values are 'auto', 'none'")
    if cfg.num_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.num_threads)
    output_dir = Path(output_dir)
    ckpt_root = output_dir / "checkpoints"
    rank = torch.distributed.get_rank()
    latest = ckpt_lib.latest_checkpoint(ckpt_root) if ckpt_root.exists() else None
    if latest is not None and resume == "none":
        raise FileExistsError(f"{output_dir}: already holds checkpoints ({latest.name}); use "
                              f"--resume auto to continue it or choose another --output")

    parallel.setup_model_parallel(cfg.parallel)
    chunks, optimizer, scheduler = _build(cfg)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    cfg.num_microbatches(dp_size)  # validates the batch layout against DP

    state = {"step": 0, "tokens": 0, "device_seconds": 0.0}
    if latest is not None:
        loaded = ckpt_lib.load_checkpoint(latest, model_chunks=chunks, optimizer=optimizer,
                                          scheduler=scheduler)
        state.update({k: loaded[k] for k in state if k in loaded})
    elif init_from is not None:
        ckpt_lib.load_weights(chunks, init_from)

    meta = dict(run_meta or {}, model_config=cfg.model.to_dict(), train_config=cfg.to_dict(),
                init_from=str(init_from) if init_from else None)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "run.json", meta)
    logger = RunLogger(output_dir, enabled=rank == 0, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                       wandb_project=cfg.wandb_project, config=cfg.to_dict(),
                       progress=cfg.progress, total_steps=cfg.steps, start_step=state["step"],
                       name=(run_meta or {}).get("name", output_dir.name))
    world = torch.distributed.get_world_size()
    losses: list[tuple[int, float]] = []
    valid: dict[str, float] = {}
    last_saved = latest
    end = cfg.steps if stop_after is None else min(cfg.steps, state["step"] + stop_after)

    def save(step):
        return ckpt_lib.save_checkpoint(ckpt_root, step=step, model_chunks=chunks, optimizer=optimizer,
                                        scheduler=scheduler, state=dict(state), meta=meta,
                                        keep=cfg.keep_checkpoints)
    try:
        while state["step"] < end:
            step = state["step"]
            t0 = time.perf_counter()
            for m in chunks:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            mbs = batches.train_microbatches(
                train_dataset, step=step, global_batch_size=cfg.global_batch_size,
                micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
            loss = _run_schedule(chunks, mbs, cfg, forward_only=False)
            if not math.isfinite(loss):
                where = last_saved.name if last_saved else "none (no checkpoint was saved yet)"
                raise TrainingDiverged(f"loss is {loss} at step {step + 1}; stopping. Last good "
                                       f"checkpoint: {where} under {ckpt_root}")
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["tokens"] += cfg.tokens_per_step()
            state["device_seconds"] += dt * world
            losses.append((state["step"], loss))
            metrics = {"loss": loss, "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm or 0.0), "tokens_per_s": cfg.tokens_per_step() / dt}
            if cfg.log_interval and state["step"] % cfg.log_interval == 0:
                logger.log(state["step"], dict(metrics, tokens=state["tokens"]))
            logger.progress({"loss": loss, "tok/s": metrics["tokens_per_s"]})
            if valid_datasets and cfg.eval_interval and state["step"] % cfg.eval_interval == 0:
                valid = evaluate(chunks, valid_datasets, cfg)
                logger.log(state["step"], {f"valid/{d}": v for d, v in valid.items()})
            if cfg.save_interval and state["step"] % cfg.save_interval == 0:
                last_saved = save(state["step"])
        if valid_datasets and (not cfg.eval_interval or state["step"] % cfg.eval_interval):
            valid = evaluate(chunks, valid_datasets, cfg)
            logger.log(state["step"], {f"valid/{d}": v for d, v in valid.items()})
        if last_saved is None or last_saved.name != ckpt_lib.iter_name(state["step"]):
            last_saved = save(state["step"])
    finally:
        logger.close()
    return TrainResult(output_dir=output_dir, step=state["step"], tokens=state["tokens"],
                       losses=losses, valid_loss=valid, checkpoint=last_saved,
                       device_seconds=state["device_seconds"])


def save_initial_weights(cfg: TrainConfig, output: str | Path) -> Path:
    """Build the model from `cfg.model.init_seed` and save it as a weights-only checkpoint
    (random-init experts, reproducible starting points). Collective over all ranks."""
    parallel.setup_model_parallel(cfg.parallel)
    chunks, _, _ = _build(cfg)
    return ckpt_lib.save_checkpoint(output, step=0, model_chunks=chunks,
                                    meta={"model_config": cfg.model.to_dict(), "kind": "init"})


def load_for_eval(cfg: TrainConfig, checkpoint: str | Path):
    """Model chunks (eval mode) at the current TP/PP with weights from any checkpoint."""
    parallel.setup_model_parallel(cfg.parallel)
    chunks, _, _ = _build(cfg)
    ckpt_lib.load_weights(chunks, checkpoint)
    for m in chunks:
        m.eval()
    return chunks
