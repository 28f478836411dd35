"""The building blocks of an experiment: train configs, forests (a run plan on the in-process
executor: the same stage graph and rules as `btm run`), evaluation of single models, and the
random-split corpus. Each is resumable: done graph nodes are skipped, an interrupted training
run resumes from its checkpoint.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from megatron_btm.experiment.plan import ExperimentPlan
from megatron_btm.stages.train import STAGE_FILE
from megatron_btm.utils.io import atomic_write_text, read_json


def prepare_data(plan: ExperimentPlan, data: Path, log: Callable[[str], None]) -> int:
    """Preprocess every domain of the plan into `data` once (BPE on the train splits), unless it
    is there; returns the tokenizer's vocabulary size."""
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    from megatron_btm.data.tokenizer import load_tokenizer
    if not (Path(data) / "report.json").is_file():
        log(f"== preprocess {len(plan.train_domains + plan.novel_domains)} domains")
        preprocess(PreprocessConfig(corpus_dir=plan.corpus, output_dir=str(data),
                                    domains=plan.train_domains + plan.novel_domains,
                                    vocab_size=plan.vocab_size, max_docs=plan.max_docs,
                                    overwrite=True, progress=False))
    return load_tokenizer(Path(data) / "tokenizer.json").vocab_size


def train_section(plan: ExperimentPlan, steps: int, vocab: int, seed: int = 1234, *,
                  expert: bool = False) -> dict[str, Any]:
    """The training config of every run of the plan (a run plan's `train:`): only steps, the
    seed and, for an expert run (`expert`), the batch (plan.expert_global_batch_size) differ."""
    import dataclasses
    batch = _batch(plan, expert)
    return {
        "model": {**dataclasses.asdict(plan.model), "vocab_size": vocab, "init_seed": seed},
        "steps": steps, **batch, "seed": seed,
        "optim": {"lr": plan.lr, "min_lr": plan.min_lr,
                  "warmup_steps": max(1, round(steps * plan.warmup_fraction))},
        # validation once at the end; a few checkpoints per run so an interrupted run resumes
        "eval_interval": 0, "eval_iters": 2, "save_interval": max(1, steps // 3),
        "keep_checkpoints": 1, "tensorboard": False, "progress": False,
        "num_threads": plan.threads}


def _batch(plan: ExperimentPlan, expert: bool) -> dict[str, int]:
    if expert:
        return {"micro_batch_size": plan.expert_micro_batch_size(),
                "global_batch_size": plan.expert_batch_size()}
    return {"micro_batch_size": plan.micro_batch_size, "global_batch_size": plan.global_batch_size}


def train_config(plan: ExperimentPlan, steps: int, vocab: int, seed: int = 1234, *,
                 expert: bool = False):
    from megatron_btm.training.config import TrainConfig
    return TrainConfig.from_dict(train_section(plan, steps, vocab, seed, expert=expert))


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
                 expert_data: Path | None = None, seed_domains: list[str] | None = None) -> Path:
    """Seed (trained for seed_steps; a random init when 0; `seed_checkpoint` to share one) →
    one cycle: a copy of the seed per domain → train → merge, as a run plan on the in-process
    executor (work/ is its run_dir). The seed trains on the mixture of `seed_domains` (default:
    all training domains). The run plan's `train:` is the experts' config; the seed overrides
    its batch when the experts train with a smaller one (its warmup stays the section's, as
    before). Returns the forest root."""
    from megatron_btm.pipeline import graph as G
    from megatron_btm.pipeline.executors import run_inprocess
    from megatron_btm.pipeline.nodes import freeze
    from megatron_btm.pipeline.plan import plan_from_dict
    if seed_checkpoint is not None:
        seed = {"checkpoint": str(Path(seed_checkpoint).resolve())}   # the run plan wants absolute paths
    else:
        seed = {"domains": list(seed_domains or plan.train_domains), "steps": seed_steps}
        if plan.expert_batch_size() != plan.global_batch_size:   # the seed keeps the dense batch
            seed["overrides"] = _batch(plan, expert=False)
    run = plan_from_dict({
        "name": "experiment", "run_dir": str(Path(work).resolve()),
        "data_dir": str(Path(expert_data or data).resolve()),
        # threads may change between invocations (RESUME_FREE_KEYS): not part of the frozen plan
        "train": {**train_section(plan, expert_steps, vocab, plan.forest_seed, expert=True),
                  "num_threads": None},
        "seed": seed,
        "cycles": [{"domains": list(domains or plan.train_domains)}],
        "branch": {"policy": "seed"}, "executor": {"kind": "inprocess"}})
    freeze(run)
    log(f"  forest: seed {seed_checkpoint or f'{seed_steps} steps'}, "
        f"{len(run.cycles[0].domains)} experts x {expert_steps} steps")
    run_inprocess(run, G.build_graph(run), log=lambda s: None)
    return Path(run.forest_dir)


def expert_run(work: Path, domain: str) -> Path:
    from megatron_btm.pipeline import graph as G
    return Path(work) / G.expert_run(1, domain)


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
