"""Train stage: the seed LM on a mixture of domains, or one expert on its domain.

Both run the same Megatron-Core loop (`training.loop.train`) on datasets built from
preprocessed data; they differ in the blend (mixture vs one domain) and the initialisation
(random vs the branch checkpoint). Each finished run writes `stage.json` — the record the
merge stage and the compute accounting read.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_btm.data import identity
from megatron_btm.forest.staging import hash_tree
from megatron_btm.stages import run_checks
from megatron_btm.utils.io import atomic_write_json, read_json

if TYPE_CHECKING:  # the config pulls in torch; `btm --help` must not
    from megatron_btm.training.config import TrainConfig

STAGE_FILE = "stage.json"
BRANCH_FILE = "branch.json"
# fields that must agree between an expert and the checkpoint it branches from
ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
               "vocab_size", "tie_embeddings", "make_vocab_size_divisible_by",
               "position_embedding_type", "rotary_base", "rope_scaling_factor", "normalization",
               "layernorm_epsilon", "gated_linear_unit", "activation", "num_query_groups",
               "kv_channels", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
               "num_moe_experts", "moe_ffn_hidden_size", "moe_router_enable_expert_bias",
               "moe_router_score_function")


def _check_vocab(cfg: TrainConfig, tokenizer, data_dir) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary "
                         f"of {Path(data_dir) / 'tokenizer.json'} ({tokenizer.vocab_size}); "
                         f"set model.vocab_size={tokenizer.vocab_size}")


def check_same_architecture(cfg: TrainConfig, init_meta: dict[str, Any], where: str) -> None:
    saved = init_meta.get("model_config") or {}
    for name in ARCH_FIELDS:
        if name in saved and saved[name] != getattr(cfg.model, name):
            raise ValueError(f"{where}: model.{name}={saved[name]!r} in the checkpoint but "
                             f"{getattr(cfg.model, name)!r} in the config; experts must share "
                             f"the architecture of the forest")


def run_training(cfg: TrainConfig, *, data_dir: str | Path, blend: dict[str, float],
                 output_dir: str | Path, kind: str, init_from: str | Path | None = None,
                 resume: str = "auto", valid_domains: list[str] | None = None,
                 extra_record: dict[str, Any] | None = None, allow_change: list[str] = (),
                 extra_meta: dict[str, Any] | None = None, trainable=None,
                 stop_after: int | None = None):
    """Build datasets, train, write stage.json. Collective over all ranks of the job.

    `extra_meta` goes into run.json and every checkpoint's meta.json; `trainable` and
    `stop_after` are the loop's (training.loop.train).

    Before training: the data's tokenizer must be the branch checkpoint's; a resumed run must be
    the run of its run.json (`run_checks.check_resume`; `allow_change` names keys that may
    differ); a domain read many times over is warned about. stage.json records the sha256 of
    the final checkpoint's files, which the merge verifies before copying it."""
    import torch

    from megatron_btm.data.datasets import build_gpt_datasets
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.megatron import checkpoint as ckpt_lib
    from megatron_btm.megatron import parallel
    from megatron_btm.training.loop import train

    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer.json")
    _check_vocab(cfg, tokenizer, data_dir)
    if init_from is not None:
        init_from = ckpt_lib.resolve_checkpoint(init_from)
        check_same_architecture(cfg, ckpt_lib.read_meta(init_from), str(init_from))
        identity.check_checkpoints([("--checkpoint", init_from)], (
            f"--data {Path(data_dir) / 'tokenizer.json'}", tokenizer.sha256))
    changes = _check_resumed_run(cfg, output_dir, resume=resume, blend=blend, kind=kind,
                                 tokenizer_sha256=tokenizer.sha256, allow_change=allow_change)
    run_checks.warn_repeats(data_dir, blend, samples=cfg.steps * cfg.global_batch_size,
                            seq_length=cfg.model.seq_length)
    parallel.init_distributed()
    dp = cfg.parallel.data_parallel_size(torch.distributed.get_world_size())
    train_ds, valid = build_gpt_datasets(
        data_dir, blend=blend, seq_length=cfg.model.seq_length,
        num_train_samples=cfg.steps * cfg.global_batch_size,
        num_valid_samples=max(cfg.eval_iters, 1) * cfg.micro_batch_size * dp, seed=cfg.seed,
        tokenizer=tokenizer, valid_domains=valid_domains, cache_dir=output_dir / "index-cache",
        create_attention_mask=False)
    meta = {"kind": kind, "blend": blend, "data_dir": str(data_dir), "name": output_dir.name,
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_vocab_size": tokenizer.vocab_size,
            **(extra_meta or {}), **({"resume_changes": changes} if changes else {})}
    result = train(cfg, train_dataset=train_ds, valid_datasets=valid, output_dir=output_dir,
                   init_from=init_from, resume=resume, run_meta=meta, trainable=trainable,
                   stop_after=stop_after)
    if torch.distributed.get_rank() == 0 and result.step >= cfg.steps:  # finished (stop_after)
        record = dict(extra_record or {}, kind=kind, blend=blend, steps=result.step,
                      tokens=result.tokens, device_seconds=result.device_seconds,
                      final_loss=result.losses[-1][1] if result.losses else None,
                      valid_loss=result.valid_loss, checkpoint=result.checkpoint.name,
                      init_from=str(init_from) if init_from else None,
                      tokenizer_sha256=tokenizer.sha256, tokenizer_vocab_size=tokenizer.vocab_size,
                      checkpoint_files=hash_tree(result.checkpoint),
                      finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        atomic_write_json(output_dir / STAGE_FILE, record)
    return result


def _check_resumed_run(cfg, output_dir: Path, *, resume: str, blend, kind: str,
                       tokenizer_sha256: str, allow_change) -> list[dict]:
    """Resuming (`auto` and the folder holds a checkpoint): refuse a different run (see
    run_checks); return the history of allowed changes to record in run.json."""
    from megatron_btm.megatron.checkpoint import latest_checkpoint
    run_json = output_dir / "run.json"
    ckpts = output_dir / "checkpoints"
    if resume != "auto" or not ckpts.is_dir() or latest_checkpoint(ckpts) is None:
        if allow_change:
            raise ValueError(f"--allow-change applies to a resumed run; {output_dir} holds no "
                             "checkpoint to resume")
        return []
    if not run_json.is_file():
        return []
    run = read_json(run_json)
    now = run_checks.run_identity(cfg, blend=blend, tokenizer_sha256=tokenizer_sha256, kind=kind)
    new = run_checks.check_resume(run_json, run, now, allow_change)
    return [*run.get("resume_changes", []), *new]


def train_seed(cfg: TrainConfig, *, data_dir, domains: list[str], output_dir,
               weights: dict[str, float] | None = None, resume: str = "auto",
               allow_change: list[str] = ()):
    """The seed LM on the (balanced by default) mixture of `domains`."""
    if not domains:
        raise ValueError("domains: the seed needs at least one domain")
    blend = {d: float((weights or {}).get(d, 1.0)) for d in domains}
    return run_training(cfg, data_dir=data_dir, blend=blend, output_dir=output_dir, kind="seed",
                        resume=resume, valid_domains=list(domains), allow_change=allow_change)


def train_expert(cfg: TrainConfig, *, data_dir, domain: str, output_dir, init_from=None,
                 resume: str = "auto", allow_change: list[str] = ()):
    """One expert on `domain`, initialised from a branch folder (or random init when None).

    The branch record (init_from/branch.json) is frozen into the run folder at the first start:
    a resumed run keeps the lineage of the weights it started from, whatever the branch folder
    holds now, and stage.json carries that record to the merge."""
    output_dir = Path(output_dir)
    frozen = output_dir / BRANCH_FILE
    branch = None
    if frozen.is_file():
        branch = read_json(frozen)
    elif init_from is not None and (Path(init_from) / BRANCH_FILE).exists():
        branch = read_json(Path(init_from) / BRANCH_FILE)
    if branch is not None and branch.get("domain") not in (None, domain):
        raise ValueError(f"{Path(init_from or output_dir) / BRANCH_FILE}: branched for domain "
                         f"{branch['domain']!r}, not {domain!r}")
    if branch is not None and not frozen.is_file():
        atomic_write_json(frozen, branch)
    return run_training(cfg, data_dir=data_dir, blend={domain: 1.0}, output_dir=output_dir,
                        kind="expert", init_from=init_from, resume=resume, valid_domains=[domain],
                        extra_record={"domain": domain, "branch": branch},
                        allow_change=allow_change)


def read_stage(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STAGE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found — the run in {run_dir} has not finished "
                                f"(or did not run); merge only finished runs")
    return read_json(path)
