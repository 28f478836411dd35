"""The building blocks of an experiment: train configs, forests, evaluation of single models,
and the random-split corpus. Each is resumable: a finished training run (stage.json) is not
re-run, an interrupted one resumes from its checkpoint, forest merges are idempotent.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable

from megatron_btm.experiment.plan import ExperimentPlan
from megatron_btm.utils.io import atomic_write_text, read_json

STAGE_FILE = "stage.json"


def train_config(plan: ExperimentPlan, steps: int, vocab: int, seed: int = 1234):
    """The TrainConfig of every run of the plan: only steps and the seed differ."""
    from megatron_btm.training.config import TrainConfig
    return TrainConfig.from_dict({
        "model": {"num_layers": plan.model.num_layers, "hidden_size": plan.model.hidden_size,
                  "num_attention_heads": plan.model.num_attention_heads,
                  "seq_length": plan.model.seq_length, "vocab_size": vocab, "init_seed": seed},
        "steps": steps, "micro_batch_size": plan.micro_batch_size,
        "global_batch_size": plan.global_batch_size, "seed": seed,
        "optim": {"lr": plan.lr, "min_lr": plan.min_lr,
                  "warmup_steps": max(1, round(steps * plan.warmup_fraction))},
        # validation once at the end; a few checkpoints per run so an interrupted run resumes
        "eval_interval": 0, "eval_iters": 2, "save_interval": max(1, steps // 3),
        "keep_checkpoints": 1, "tensorboard": False, "progress": False,
        "num_threads": plan.threads})


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The stage record of a finished training run, or None."""
    path = Path(run_dir) / STAGE_FILE
    return read_json(path) if path.is_file() else None


def run_dense(plan: ExperimentPlan, data: Path, out: Path, steps: int, vocab: int, seed: int
              ) -> dict[str, Any]:
    from megatron_btm.stages.train import run_training
    if finished(out) is None:
        run_training(train_config(plan, steps, vocab, seed), data_dir=data,
                     blend={d: 1.0 for d in plan.train_domains}, output_dir=out, kind="dense",
                     valid_domains=plan.train_domains)
    return finished(out)


def build_forest(plan: ExperimentPlan, data: Path, work: Path, *, seed_steps: int,
                 expert_steps: int, vocab: int, log: Callable[[str], None],
                 seed_checkpoint: Path | None = None, domains: list[str] | None = None,
                 expert_data: Path | None = None) -> Path:
    """Seed (trained for seed_steps; a random init when 0; `seed_checkpoint` to share one) →
    branch copies of the seed → train one expert per domain → merge. Returns the forest root."""
    from megatron_btm.forest import Forest
    from megatron_btm.stages.branch import BranchConfig, branch
    from megatron_btm.stages.merge import merge_expert, merge_seed
    from megatron_btm.stages.train import train_expert, train_seed
    from megatron_btm.training.loop import save_initial_weights

    forest_root = work / "forest"
    domains = domains or plan.train_domains
    expert_data = expert_data or data
    if not Forest.exists(forest_root):
        if seed_checkpoint is not None:
            Forest.create(forest_root, seed_checkpoint=seed_checkpoint, copy=True,
                          seed_meta={"kind": "shared-seed", "source": str(seed_checkpoint)})
        elif seed_steps == 0:
            log("  seed: random init (0% seed compute)")
            init_root = work / "init"
            shutil.rmtree(init_root, ignore_errors=True)  # an interrupted save: start over
            ckpt = save_initial_weights(train_config(plan, 1, vocab), init_root)
            Forest.create(forest_root, seed_checkpoint=ckpt, copy=True,
                          seed_meta={"kind": "random-init", "steps": 0, "tokens": 0})
        else:
            log(f"  seed: {seed_steps} steps on the mixture of {len(plan.train_domains)} domains")
            if finished(work / "seed") is None:
                train_seed(train_config(plan, seed_steps, vocab), data_dir=data,
                           domains=plan.train_domains, output_dir=work / "seed")
            merge_seed(forest_root, work / "seed")
    have = {e.id for e in Forest.open(forest_root).experts()}
    for d in domains:
        if d in have:
            continue
        log(f"  expert {d}: {expert_steps} steps")
        branch_dir = work / "branch"
        if not (branch_dir / d / "branch.json").is_file():
            # policy "seed": an expert is a copy of the seed even if others are already merged
            branch(forest_root, domains=[d], data_dir=expert_data, output_dir=branch_dir,
                   cfg=BranchConfig(policy="seed"), cycle=1)
        run_dir = work / "experts" / d
        if finished(run_dir) is None:
            train_expert(train_config(plan, expert_steps, vocab), data_dir=expert_data, domain=d,
                         output_dir=run_dir, init_from=branch_dir / d)
        merge_expert(forest_root, run_dir, domain=d, cycle=1)
    return forest_root


def eval_models(models: dict[str, Path], data: Path, domains: list[str], *, split: str,
                max_blocks: int) -> dict[str, dict[str, dict[str, float]]]:
    """{domain: {name: {nll, ppl, tokens}}} of single models (any checkpoint folder)."""
    from megatron_btm.inference.blocks import read_eval_blocks
    from megatron_btm.inference.ensemble import single_model_row
    from megatron_btm.inference.scoring import IGNORE, model_config_of, score_checkpoints
    cfg = model_config_of(next(iter(models.values())))[0]
    blocks = {d: read_eval_blocks(data, d, split, cfg.seq_length, max_blocks=max_blocks,
                                  vocab_size=cfg.vocab_size) for d in domains}
    ll = score_checkpoints(list(models.items()), blocks)
    out: dict[str, dict[str, Any]] = {}
    for d in domains:
        valid_NT = blocks[d][:, 1:] != IGNORE
        out[d] = {name: single_model_row(ll[d][..., j], valid_NT) for j, name in enumerate(models)}
    return out


def _first_lines(path: Path, limit: int | None) -> list[str]:
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line if line.endswith("\n") else line + "\n")
                if limit is not None and len(lines) >= limit:
                    break
    return lines


def random_split_corpus(plan: ExperimentPlan, out: Path) -> list[str]:
    """Write n pseudo-domains `random<i>` (n = number of training domains) holding the same
    documents the domain experts train on (the first max_docs of each domain's train / valid
    split), shuffled and dealt round-robin. Pure function of the plan: same seed, same split."""
    names = [f"random{i}" for i in range(len(plan.train_domains))]
    rng = random.Random(plan.split_seed)
    for split in ("train", "valid"):
        docs = [line for d in plan.train_domains
                for line in _first_lines(Path(plan.corpus) / d / f"{split}.jsonl", plan.max_docs)]
        rng.shuffle(docs)
        for i, name in enumerate(names):
            (out / name).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / name / f"{split}.jsonl", "".join(docs[i::len(names)]))
    return names
