"""The whole BTM run behind `btm demo`, in one process, resumable stage by stage.

preprocess → the BTM run plan on the in-process executor (seed on seed_fraction of the budget →
cycle 1: a copy of the seed per domain → train each expert → merge) → compute-matched dense baseline → cached priors → parameter
averages → evaluation table → plots + report. Re-running with the same output folder skips
finished stages (done graph nodes are skipped; training resumes from checkpoints).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_btm.inference import rows as R
from megatron_btm.utils.io import atomic_write_json


@dataclass(kw_only=True)
class DemoConfig:
    """A small, complete BTM run. Defaults chosen by bench/demo_sweep.py on the valid split
    (bench/results/demo-embedded/sweep.md): the largest ensemble-over-dense gain within ~5 min on
    2 CPU cores."""

    output: str = "demo-out"
    """Output folder (data, forest, runs, results.json, report.md, plots)."""
    corpus: str | None = None
    """Folder of <domain>/{train,valid,test}.jsonl; None harvests the embedded default corpus
    (Python stdlib source, torch's C++ headers, licence texts, package descriptions)."""
    domains: list[str] | None = None
    """Domains to use (None: all of the corpus)."""
    max_bytes_per_domain: int = 1_500_000
    """Text per domain harvested for the embedded corpus."""
    max_train_docs: int | None = 600
    """Documents per domain preprocessed from each split (None: all)."""
    vocab_size: int = 4096
    """BPE vocabulary trained on the corpus."""
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 2
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 16
    lr: float = 2e-3
    total_steps: int = 300
    """Optimizer steps of the whole BTM run (seed + all experts); the dense baseline gets the same."""
    seed_fraction: float = 0.75
    """Share of total_steps spent on the seed LM."""
    eval_blocks: int = 24
    """Test blocks (of seq_length tokens) per domain."""
    prior_sequences: int = 32
    """Held-out sequences per domain for the cached prior."""
    threads: int | None = None
    """torch threads (None: all cores)."""
    eval_split: str = "test"
    """Split of the evaluation table: test for the demo's verdict; bench/demo_sweep.py scores on
    valid so that choosing the defaults never looks at test."""

    def __post_init__(self):
        if not 0.0 < self.seed_fraction < 1.0:
            raise ValueError(f"seed_fraction={self.seed_fraction}: must be in (0, 1)")
        if self.total_steps < 10:
            raise ValueError(f"total_steps={self.total_steps}: must be >= 10")
        if self.eval_split not in ("valid", "test"):
            raise ValueError(f"eval_split={self.eval_split!r}: must be 'valid' or 'test'")

    def train_section(self, steps: int, vocab_size: int) -> dict[str, Any]:
        """The training config of every run of the demo (a run plan's `train:`)."""
        return {
            "model": {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                      "num_attention_heads": self.num_attention_heads,
                      "seq_length": self.seq_length, "vocab_size": vocab_size},
            "steps": steps, "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "optim": {"lr": self.lr, "min_lr": self.lr / 10, "warmup_steps": max(1, steps // 20)},
            "eval_interval": 0, "eval_iters": 2, "save_interval": max(steps // 2, 1),
            "keep_checkpoints": 1, "tensorboard": True, "progress": True,
            "num_threads": self.threads}

    def train_config(self, steps: int, vocab_size: int):
        from megatron_btm.training.config import TrainConfig
        return TrainConfig.from_dict(self.train_section(steps, vocab_size))

    def run_plan(self, out: Path, domains: list[str], vocab_size: int):
        """The BTM part of the demo as a run plan: seed on the mixture, then one cycle of a
        seed copy per domain, on the in-process executor."""
        from megatron_btm.pipeline.plan import plan_from_dict
        seed_steps, expert_steps = self.steps(len(domains))
        return plan_from_dict({
            "name": "demo", "run_dir": str(out.resolve()), "data_dir": str((out / "data").resolve()),
            # threads may differ between invocations: set per process, not part of the plan
            "train": {**self.train_section(expert_steps, vocab_size), "num_threads": None},
            "seed": {"domains": domains, "steps": seed_steps}, "cycles": [{"domains": domains}],
            "branch": {"policy": "seed"}, "executor": {"kind": "inprocess"}})

    def steps(self, num_domains: int) -> tuple[int, int]:
        """(seed steps, steps per expert) of total_steps."""
        seed_steps = max(1, round(self.total_steps * self.seed_fraction))
        return seed_steps, max(1, (self.total_steps - seed_steps) // num_domains)


def _stage(name: str, log) -> float:
    log(f"== {name}")
    return time.perf_counter()


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    import torch

    from megatron_btm.averaging.apply import average_checkpoints
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    from megatron_btm.data.tokenizer import load_tokenizer
    from megatron_btm.demo import report
    from megatron_btm.inference import estimate_priors, evaluate_forest, forest_checkpoints
    from megatron_btm.megatron import parallel
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    from megatron_btm.pipeline.executors import run_inprocess
    from megatron_btm.pipeline.graph import build_graph
    from megatron_btm.pipeline.nodes import freeze
    from megatron_btm.stages.train import run_training

    t_start = time.perf_counter()
    out = Path(cfg.output)
    if cfg.corpus is not None and not Path(cfg.corpus).is_dir():   # before anything is written
        raise FileNotFoundError(f"--corpus {cfg.corpus}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = Path(cfg.corpus) if cfg.corpus else out / "corpus"
    if cfg.corpus is None and not (corpus / "harvest.json").exists():
        _stage("harvest the embedded default corpus", log)
        from megatron_btm.data.embedded import harvest_default_corpus
        harvest_default_corpus(str(corpus), max_bytes_per_domain=cfg.max_bytes_per_domain)
    if not corpus.is_dir():
        raise FileNotFoundError(f"--corpus {corpus}: not a folder")
    available = sorted(p.name for p in corpus.iterdir() if (p / "train.jsonl").exists())
    domains = list(cfg.domains or available)
    unknown = [d for d in domains if d not in available]
    if unknown:
        raise ValueError(f"--domains: {unknown} not in {corpus} (available: {', '.join(available)})")
    if len(domains) < 2:
        raise ValueError(f"--domains: need at least 2 domains for a forest, got {domains}")

    data = out / "data"
    if not (data / "report.json").exists():
        _stage(f"preprocess {len(domains)} domains", log)
        preprocess(PreprocessConfig(corpus_dir=str(corpus), output_dir=str(data), domains=domains,
                                    vocab_size=cfg.vocab_size, max_docs=cfg.max_train_docs,
                                    overwrite=True))
    vocab = load_tokenizer(data / "tokenizer.json").vocab_size
    parallel.init_distributed()

    seed_steps, expert_steps = cfg.steps(len(domains))
    forest_root = out / "forest"
    _stage(f"BTM: seed ({seed_steps} steps on the mixture of {len(domains)} domains), then "
           f"{len(domains)} experts ({expert_steps} steps each) branched from it, merged", log)
    plan = cfg.run_plan(out, domains, vocab)
    freeze(plan)
    run_inprocess(plan, build_graph(plan), log=log)

    dense_steps = seed_steps + expert_steps * len(domains)
    _stage(f"dense baseline: {dense_steps} steps on the balanced mixture (compute-matched)", log)
    run_training(cfg.train_config(dense_steps, vocab), data_dir=data,
                 blend={d: 1.0 for d in domains}, output_dir=out / "dense", kind="dense",
                 valid_domains=domains)

    _stage("cached priors (held-out valid split)", log)
    checkpoints = forest_checkpoints(forest_root)  # verified once; every step below reuses it
    priors = estimate_priors(forest_root, data, domains, split="valid",
                             num_sequences=cfg.prior_sequences, checkpoints=checkpoints)
    priors = {d: [float(x) for x in priors[d]] for d in domains}
    expert_ids = [eid for eid, _ in checkpoints]
    atomic_write_json(out / "priors.json", {"experts": expert_ids, "priors": priors})

    _stage("parameter averages (uniform; posterior-weighted per domain)", log)
    ckpts = [path for _, path in checkpoints]
    averages = out / "averages"
    if not (averages / "uniform").exists():
        average_checkpoints(ckpts, [1.0 / len(ckpts)] * len(ckpts), averages / "uniform", progress=False)
    for d in domains:
        if not (averages / f"posterior-{d}").exists():
            average_checkpoints(ckpts, priors[d], averages / f"posterior-{d}", progress=False)

    _stage(f"evaluate on the {cfg.eval_split} split", log)
    dense_ckpt = resolve_checkpoint(out / "dense")
    table: dict[str, dict[str, Any]] = {}
    for d in domains:
        result = evaluate_forest(
            forest_root, data, [d], split=cfg.eval_split, priors={d: priors[d]}, topk=(1, 2),
            extra_models={R.model_name(R.DENSE): dense_ckpt,
                          R.model_name(R.UNIFORM_AVERAGE): averages / "uniform",
                          R.model_name(R.POSTERIOR_AVERAGE): averages / f"posterior-{d}"},
            max_blocks=cfg.eval_blocks, checkpoints=checkpoints)
        table[d] = _rename_rows(result["results"][d])

    _stage("report", log)
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    summary = {"corpus": str(cfg.corpus or "embedded default (harvested from this environment)"),
               "model": f"GPT {cfg.num_layers}x{cfg.hidden_size}, seq {cfg.seq_length}, vocab {vocab}",
               "seed_tokens": seed_steps * tokens_per_step, "seed_fraction": cfg.seed_fraction,
               "expert_tokens": expert_steps * len(domains) * tokens_per_step,
               "dense_tokens": dense_steps * tokens_per_step,
               "seconds": time.perf_counter() - t_start}
    results = {"config": dataclasses.asdict(cfg), "domains": domains, "experts": expert_ids,
               "priors": priors, "table": table, "summary": summary}
    atomic_write_json(out / "results.json", results)
    report.plot_perplexities(table, domains, out / "ppl_by_domain.png")
    report.plot_posterior_heatmap(priors, expert_ids, out / "posterior_heatmap.png")
    report.write_report(out / "report.md", table=table, domains=domains, priors=priors,
                        expert_ids=expert_ids, summary=summary)
    log(report.markdown_table(table, domains))
    log(report.explanation(table, domains))
    log(f"wrote {out / 'report.md'}, {out / 'results.json'} and plots in {summary['seconds']:.0f} s")
    return results


ROWS = [(R.DENSE, "dense (compute-matched)"), (R.ENSEMBLE_UNIFORM, "uniform ensemble"),
        (R.ENSEMBLE_CACHED, "cached-prior ensemble"), (R.topk_row(1), "top-1 (cached prior)"),
        (R.topk_row(2), "top-2 (cached prior)"), (R.UNIFORM_AVERAGE, "uniform average"),
        (R.POSTERIOR_AVERAGE, "posterior average")]


def _rename_rows(rows: dict[str, Any]) -> dict[str, Any]:
    """The demo's rows in the issue's order, with readable names; experts after the dense row."""
    named = dict(ROWS)
    order = [R.DENSE] + sorted(r for r in rows if R.is_expert_row(r)) + \
        [key for key, _ in ROWS[1:]]
    return {named.get(r, r): rows[r] for r in order if r in rows}
