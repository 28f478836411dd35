"""Train stage for a mixture-of-experts checkpoint (issue 16): `btm train-moe`.

The same loop as the seed and the experts (`stages.train.run_training` → `training.loop.train`)
on a mixture of domains, starting from a Megatron-Core MoE checkpoint (`btm merge-moe`, a
`train-seed` with model.num_moe_experts, a Mixtral import). The architecture is the
checkpoint's (its meta.json model_config); only the routing knobs may change (top-k, the
load-balancing type and the aux-loss coefficient). Megatron's router computes the
load-balancing loss and attaches it to the routing probabilities (MoEAuxLossAutoScaler): its
gradient enters backward with the loss scale the pipeline schedule sets per micro-batch, and
the loop logs it as `moe/load_balancing_loss` (without its coefficient, as Megatron-LM does).

Modes:
  router-only  every parameter frozen except the routers (`*.mlp.router.*`, FlexOlmo): the
               optimizer and DDP only get those; all other tensors stay bit-identical (fp32;
               under bf16/fp16 they are the parent's rounded to that dtype, like any weight
               of such a run).
  full         every parameter trains (BTX).

The checkpoints' meta.json holds `lineage` {op, parent, parent_lineage, mode, data, blend,
steps}; stage.json is written at the end as for every run; resume is the loop's (`--resume
auto`, a different mode or blend is refused by run.json).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch; `btm --help` must not import it
    from megatron_btm.training.config import TrainConfig

MODES = ("router-only", "full")
ROUTER = ".mlp.router."
# GPTConfig fields a run may change from its parent: routing knobs, not architecture
ROUTING_KNOBS = ("moe_router_topk", "moe_aux_loss_coeff", "moe_router_load_balancing_type",
                 "moe_token_dispatcher_type")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: valid modes are {', '.join(MODES)}")
    return mode


def is_router(name: str) -> bool:
    """A router tensor (weight, bias, expert bias) by its GPTModel name."""
    return ROUTER in f".{name}"


def trainable_of(mode: str):
    """The loop's `trainable` for `mode`: None (all) or the router predicate."""
    return is_router if check_mode(mode) == "router-only" else None


def read_parent(checkpoint: str | Path) -> tuple[Path, dict[str, Any]]:
    """The MoE checkpoint and its meta.json; a dense checkpoint is refused."""
    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    model = meta.get("model_config")
    if not isinstance(model, dict):
        raise ValueError(f"--checkpoint {checkpoint}: {ckpt / 'meta.json'} has no model_config "
                         "(cannot rebuild the model)")
    if not model.get("num_moe_experts"):
        raise ValueError(f"--checkpoint {checkpoint}: not a mixture-of-experts checkpoint "
                         f"(model_config.num_moe_experts is null in {ckpt / 'meta.json'}); "
                         "make one with `btm merge-moe` or train-seed --set model.num_moe_experts=N")
    return ckpt, meta


def moe_train_config(parent_meta: dict[str, Any], config: str | Path | None,
                     overrides: list[str]) -> TrainConfig:
    """TrainConfig: the YAML (optional) with its model section over the parent's model_config,
    then the --set overrides. Architecture changes are refused later (run_training)."""
    from megatron_btm.training.config import TrainConfig
    from megatron_btm.utils.config import apply_overrides, load_yaml
    data: dict[str, Any] = {}
    if config is not None:
        data = load_yaml(config)
        data = data.get("train", data)
    data["model"] = {**parent_meta["model_config"], **(data.get("model") or {})}
    apply_overrides(data, overrides)
    return TrainConfig.from_dict(data)


def train_moe(cfg: TrainConfig, *, checkpoint: str | Path, data_dir: str | Path,
              domains: list[str], output_dir: str | Path, mode: str,
              weights: dict[str, float] | None = None, resume: str = "auto",
              allow_change: list[str] = (), stop_after: int | None = None):
    """Train the MoE `checkpoint` on the mixture of `domains` (balanced by default) in `mode`.

    Checked before anything is written: the mode, that the checkpoint is MoE, then (in
    run_training) the architecture, the tokenizer of the data against the checkpoint's, and a
    resumed run against its run.json. `stop_after`: end early after that many steps (tests)."""
    trainable = trainable_of(mode)
    if not domains:
        raise ValueError("--domains: train-moe needs at least one domain")
    ckpt, parent = read_parent(checkpoint)
    from megatron_btm.stages.train import run_training
    blend = {d: float((weights or {}).get(d, 1.0)) for d in domains}
    lineage = {"op": "train-moe", "parent": str(ckpt), "parent_kind": parent.get("kind"),
               "parent_lineage": parent.get("lineage"), "mode": mode, "data": str(data_dir),
               "blend": blend, "steps": cfg.steps,
               "routing": {k: getattr(cfg.model, k) for k in ROUTING_KNOBS}}
    # the experts keep their identity through training: `btm moe remove --expert ID` and the
    # export still name them by the merge's expert ids
    carried = {k: parent[k] for k in ("moe_merge",) if k in parent}
    return run_training(cfg, data_dir=data_dir, blend=blend, output_dir=output_dir,
                        kind=f"moe-{mode}", init_from=ckpt, resume=resume,
                        valid_domains=list(domains), allow_change=allow_change,
                        extra_record={"mode": mode, "lineage": lineage},
                        extra_meta={"lineage": lineage, **carried}, trainable=trainable,
                        stop_after=stop_after)
