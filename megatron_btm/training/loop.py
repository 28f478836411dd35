"""The training loop: Megatron-Core model, DDP, optimizer and pipeline schedule.

One function, `train`, used for the seed LM and for every expert. Parallelism is composed in
one ordered block (`_setup`, `builder.build`): process groups → device choices → seeds →
model chunks → device → Float16Module → DDP → optimizer → LR schedule. Each step runs
Megatron's own `get_forward_backward_func` (no pipelining, 1F1B or interleaved), then
`optimizer.step()`. Losses stay on the device until a log, evaluation or save step reads
them back (the only host synchronisation of the loop; Megatron's optimizer has its own).
"""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_btm.errors import DivergedError
from megatron_btm.megatron import checkpoint as ckpt_lib
from megatron_btm.megatron import device, parallel
from megatron_btm.training import batches, builder
from megatron_btm.training.config import TrainConfig
from megatron_btm.training.logger import RunLogger
from megatron_btm.utils.io import atomic_write_json

class TrainingDiverged(DivergedError):
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


def _setup(cfg: TrainConfig, trainable=None):
    """Process groups, device choices, then model chunks, optimizer and scheduler (`trainable`:
    see builder.build)."""
    parallel.setup_model_parallel(cfg.parallel)
    choices = builder.resolve_choices(cfg)
    if device.cuda():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = choices["tf32"]
    chunks, optimizer, scheduler = builder.build(cfg, choices, trainable)
    return chunks, optimizer, scheduler, choices


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return losses, partial(_masked_mean, batch["loss_mask"])


def _masked_mean(loss_mask, losses):
    mask = loss_mask.float()
    loss = (losses.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # clone: the schedule divides `loss` in place by the number of micro-batches
    return loss, {"loss": loss.detach().clone()}


def _run_schedule(chunks, microbatches, cfg: TrainConfig, forward_only: bool) -> torch.Tensor:
    """Forward(+backward) over the micro-batches; return the mean loss seen by every rank as a
    0-dim float64 tensor on this rank's device (no host synchronisation)."""
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
    local = torch.zeros(2, dtype=torch.float64, device=device.current())
    if ps.is_pipeline_last_stage(ignore_virtual=True) and out:
        for d in out:  # in order, in float64: the same sum as Python's over float(loss)
            local[0] += d["loss"].double()
        local[0] /= len(out)
        local[1] = 1.0
    torch.distributed.all_reduce(local)
    return local[0] / local[1]  # 0/0 = nan where no rank holds a loss


def _slowest_rank_device_seconds(state: dict) -> None:
    """run_state is common to every rank (rank 0's copy is saved; Megatron warns when the ranks'
    differ), but device_seconds is each rank's own training wall time × world: make it the
    slowest rank's, which is how long the job held all its devices (stage.json records it).
    One all-reduce per checkpoint."""
    t = torch.tensor([state["device_seconds"]], dtype=torch.float64, device=device.current())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    state["device_seconds"] = t.item()


def _moe_aux_losses(cfg: TrainConfig, num_microbatches: int | None) -> dict[str, torch.Tensor]:
    """This step's MoE auxiliary losses (the router's load-balancing loss, without its
    coefficient), as Megatron-LM's training_log reports them through `track_moe_metrics`:
    summed over layers / number of MoE layers, averaged over micro-batches and DP; then the
    tracker is cleared. Their gradient already entered backward: the router attaches each loss
    with MoEAuxLossAutoScaler, whose scale the schedule sets per micro-batch. `num_microbatches`
    None: forget what an earlier run of this process tracked (its names, its layer count)."""
    if not cfg.model.num_moe_experts:
        return {}
    from megatron.core.transformer.moe import moe_utils
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if num_microbatches is None:
        tracker.clear()
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    out = {f"moe/{name}": v["values"].float().sum() / (cfg.model.num_layers * num_microbatches)
           for name, v in sorted(tracker.items())}
    moe_utils.clear_aux_losses_tracker()
    return out


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
                mbs = [device.to_device(mb) for mb in mbs]
                results[domain] = float(_run_schedule(chunks, mbs, cfg, forward_only=True))
    for m in chunks:
        m.train()
    return results


def train(cfg: TrainConfig, *, train_dataset, valid_datasets: dict[str, Any] | None,
          output_dir: str | Path, init_from: str | Path | None = None, resume: str = "auto",
          run_meta: dict[str, Any] | None = None, stop_after: int | None = None,
          trainable=None) -> TrainResult:
    """Train (or resume) one LM. Needs torch.distributed initialised (`parallel.init_distributed`).

    resume="auto": continue from output_dir's latest complete checkpoint if there is one, else
    start from `init_from` weights (a branch) or from random init. resume="none": start fresh;
    refuses an output folder that already holds checkpoints. `stop_after` ends the run early
    after that many steps (for tests/benchmarks), without changing the LR schedule.
    `trainable(name)` False freezes that parameter (builder.build). An MoE model logs its
    auxiliary losses next to the loss (`moe/load_balancing_loss`, ...).
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

    chunks, optimizer, scheduler, choices = _setup(cfg, trainable)
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
                init_from=str(init_from) if init_from else None, device_choices=choices)
    if rank == 0:
        print(f"{output_dir.name}: device choices\n{device.describe(choices)}", flush=True)
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
    prefetch = batches.Prefetcher(
        partial(batches.train_microbatches, train_dataset, global_batch_size=cfg.global_batch_size,
                micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size),
        last_step=end, enabled=choices["pinned_prefetch"])
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on device) not yet read back
    aux: dict[str, torch.Tensor] = _moe_aux_losses(cfg, None)  # the last step's, on device
    synced = {"t": time.perf_counter(), "step": state["step"]}

    def save(step):
        _slowest_rank_device_seconds(state)
        with builder.params_synced(chunks, choices):
            return ckpt_lib.save_checkpoint(ckpt_root, step=step, model_chunks=chunks,
                                            optimizer=optimizer, scheduler=scheduler,
                                            state=dict(state), meta=meta, keep=cfg.keep_checkpoints)

    def read_back(grad_norm) -> dict[str, float]:
        """The one host synchronisation: losses since the last one, checked finite."""
        values = torch.stack([t for _, t in pending]).tolist()
        for (step, _), loss in zip(pending, values):
            if not math.isfinite(loss):
                where = last_saved.name if last_saved else "none (no checkpoint was saved yet)"
                raise TrainingDiverged(f"loss is {loss} at step {step}; stopping. Last good "
                                       f"checkpoint: {where} under {ckpt_root}")
            losses.append((step, loss))
        pending.clear()
        now, steps = time.perf_counter(), state["step"] - synced["step"]
        state["device_seconds"] += (now - synced["t"]) * world
        metrics = {"loss": values[-1], "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": float(grad_norm or 0.0),
                   "tokens_per_s": cfg.tokens_per_step() * steps / max(now - synced["t"], 1e-9),
                   **{k: float(v) for k, v in aux.items()}}
        if choices["dtype"] == "fp16":
            metrics["loss_scale"] = float(optimizer.get_loss_scale())
        synced.update(t=now, step=state["step"])
        return metrics
    try:
        while state["step"] < end:
            step = state["step"]
            for m in chunks:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            pending.append((step + 1, _run_schedule(chunks, prefetch.get(step), cfg, forward_only=False)))
            aux = _moe_aux_losses(cfg, cfg.num_microbatches(dp_size))
            update_ok, grad_norm, _ = optimizer.step()
            if update_ok:  # fp16: a step skipped for overflow does not advance the schedule
                scheduler.step(increment=1)
            state["step"] = step + 1
            state["tokens"] += cfg.tokens_per_step()
            s = state["step"]
            log_now = cfg.log_interval and s % cfg.log_interval == 0
            eval_now = valid_datasets and cfg.eval_interval and s % cfg.eval_interval == 0
            save_now = cfg.save_interval and s % cfg.save_interval == 0
            if log_now or eval_now or save_now or s == end:
                metrics = read_back(grad_norm)
                if log_now:
                    logger.log(s, dict(metrics, tokens=state["tokens"]))
                logger.progress({"loss": metrics["loss"], "tok/s": metrics["tokens_per_s"]})
            else:
                logger.progress(None)
            if eval_now:
                with builder.params_synced(chunks, choices):
                    valid = evaluate(chunks, valid_datasets, cfg)
                logger.log(s, {f"valid/{d}": v for d, v in valid.items()})
            if save_now:
                last_saved = save(s)
            if eval_now or save_now:  # neither counts as training time
                synced["t"] = time.perf_counter()
        if valid_datasets and (not cfg.eval_interval or state["step"] % cfg.eval_interval):
            with builder.params_synced(chunks, choices):
                valid = evaluate(chunks, valid_datasets, cfg)
            logger.log(state["step"], {f"valid/{d}": v for d, v in valid.items()})
        if last_saved is None or last_saved.name != ckpt_lib.iter_name(state["step"]):
            last_saved = save(state["step"])
    finally:
        prefetch.close()
        logger.close()
    return TrainResult(output_dir=output_dir, step=state["step"], tokens=state["tokens"],
                       losses=losses, valid_loss=valid, checkpoint=last_saved,
                       device_seconds=state["device_seconds"])


def save_initial_weights(cfg: TrainConfig, output: str | Path) -> Path:
    """Build the model from `cfg.model.init_seed` and save it as a weights-only checkpoint
    (random-init experts, reproducible starting points). Collective over all ranks."""
    chunks, _, _, _ = _setup(cfg)
    return ckpt_lib.save_checkpoint(output, step=0, model_chunks=chunks,
                                    meta={"model_config": cfg.model.to_dict(), "kind": "init"})


def load_for_eval(cfg: TrainConfig, checkpoint: str | Path):
    """Model chunks (eval mode) at the current TP/PP with weights from any checkpoint."""
    chunks, _, _, _ = _setup(cfg)
    ckpt_lib.load_weights(chunks, checkpoint)
    for m in chunks:
        m.eval()
    return chunks
