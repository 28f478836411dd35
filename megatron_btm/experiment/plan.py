"""The experiment plan: which domains, which model, how much compute, which comparisons.

A plan is one YAML file (examples/paper-mini.yaml). It is validated twice: at construction
(pure rules: fractions, k, domain lists — `ExperimentPlan.__post_init__`) and against the corpus
folder (`check_corpus`: every named domain has train/valid/test.jsonl). Every error names the
key, the value and the rule.

Compute is counted in tokens. `total_tokens` is the BTM budget T of one forest (seed + all
experts); the compute-matched dense baseline sees the same T on the balanced mixture. A seed
fraction f gives the seed round(f·S) optimizer steps of the S = T / tokens_per_step total, and
each of the n experts (S − seed_steps) // n steps; the dense model gets seed + n·expert steps,
so both sides see exactly the same tokens. With `expert_global_batch_size` B_e < B (the paper's
GPU-time matching: an expert trains on 1/n of the dense job's GPUs, so its batch is B/n) every
expert run sees the same tokens in B/B_e times as many, smaller steps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from megatron_btm.forest.names import check_domain, check_name
from megatron_btm.megatron.model import GPTConfig
from megatron_btm.utils.config import from_dict as _from_dict
from megatron_btm.utils.config import load_yaml

SPLITS = ("train", "valid", "test")


@dataclass(kw_only=True)
class ExperimentPlan:
    """A paper-in-miniature BTM experiment (see examples/paper-mini.yaml for every key)."""

    name: str
    """Label of the experiment in the report."""
    corpus: str
    """Folder of <domain>/{train,valid,test}.jsonl (relative paths: to the plan file's folder)."""
    train_domains: list[str]
    """Domains of the forest (one expert each) and of the dense baseline's mixture."""
    novel_domains: list[str] = field(default_factory=list)
    """Held-out domains: evaluated zero-shot, then branched into (seed vs posterior top-k)."""
    vocab_size: int = 8192
    """Byte-level BPE trained on the train split of all domains."""
    max_docs: int | None = None
    """Documents per domain and split preprocessed (None: all)."""
    model: GPTConfig = field(default_factory=lambda: GPTConfig(num_layers=4, hidden_size=256,
                                                               num_attention_heads=4, seq_length=256))
    micro_batch_size: int = 8
    global_batch_size: int = 8
    """Batch of the dense baselines and the seed LM."""
    expert_global_batch_size: int | None = None
    """Batch of every expert run (forest experts, random-split and novel-domain experts); must
    divide global_batch_size, and the experts keep their tokens in more, smaller steps (micro
    batch: min(micro_batch_size, this)). None: global_batch_size."""
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_fraction: float = 0.05
    """Linear warmup as a share of each run's steps (cosine decay after)."""
    total_tokens: int
    """BTM budget T of one forest (seed + all experts); the dense baseline gets the same."""
    seed_fractions: list[float] = field(default_factory=lambda: [0.5])
    """Seed compute fraction sweep; 0 = experts start from a random init."""
    main_seed_fraction: float = 0.5
    """The forest behind the ensemble / averaging / top-k / branching / removal / ablation rows."""
    dense_seeds: list[int] = field(default_factory=lambda: [1234, 4321])
    """One dense baseline per seed (init and data order); their spread is the noise level."""
    novel_tokens: int | None = None
    """Training tokens of each novel-domain expert (None: as many as one training expert)."""
    branch_k: int = 2
    """Experts averaged (posterior-weighted) to initialise a novel-domain expert."""
    topk: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Top-k ensembles (experts kept by the cached prior)."""
    removal_domain: str | None = None
    """Training domain whose expert is removed (None: the first training domain)."""
    random_split: bool = True
    """Train the random-split ablation (same documents dealt at random into n pseudo-domains)."""
    crossover_fractions: list[float] = field(default_factory=list)
    """Extra budgets (fractions of total_tokens) for dense vs ensemble at the main seed fraction:
    where the ensemble's gap to dense crosses zero as tokens per parameter grow."""
    crossover_dense_seeds: int | None = 1
    """Dense seeds (the first of dense_seeds) run at each crossover budget; None: all of them,
    so every budget has its own seed noise."""
    seed_corpora: dict[str, Any] = field(default_factory=dict)
    """Seed-corpus comparison at the main fraction and budget: label -> the training domains the
    seed trains on (or "all": the main forest itself), each followed by the same cycle on all
    train_domains and the removal of removal_domain, e.g. {code_c: [code_c], two: [code_c, legal]}."""
    eval_blocks: int = 32
    """Test blocks (seq_length tokens) per domain."""
    prior_sequences: int = 16
    """Validation blocks per domain for the cached prior (the 'choices' use validation only)."""
    split_seed: int = 1234
    """Seed of the random split."""
    forest_seed: int = 1234
    """Training seed (init, data order) of every forest's seed LM and experts; the dense baselines
    use dense_seeds. A second output with another forest_seed measures the forests' own spread."""
    threads: int | None = None
    """torch threads (None: torch's default)."""

    def __post_init__(self):
        if isinstance(self.model, dict):   # any GPTConfig field; vocab_size comes from the data
            self.model = GPTConfig.from_dict(self.model)
        check_name(self.name, "name")  # the default output folder is experiments/<name>
        self.train_domains = _domains(self.train_domains, "train_domains")
        self.novel_domains = _domains(self.novel_domains, "novel_domains")
        if len(self.train_domains) < 2:
            raise ValueError(f"train_domains={self.train_domains}: need at least 2 domains")
        both = [d for d in self.novel_domains if d in self.train_domains]
        if both:
            raise ValueError(f"novel_domains: {both} also in train_domains; a novel domain must "
                             "be unseen by the forest and the dense baseline")
        n = len(self.train_domains)
        for name in ("vocab_size", "micro_batch_size", "global_batch_size", "total_tokens",
                     "branch_k", "eval_blocks", "prior_sequences", "forest_seed"):
            _positive_int(name, getattr(self, name))
        for name in ("max_docs", "novel_tokens", "threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size={self.global_batch_size} must be a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if self.expert_global_batch_size is not None:
            _positive_int("expert_global_batch_size", self.expert_global_batch_size)
            if self.global_batch_size % self.expert_global_batch_size:
                raise ValueError(f"expert_global_batch_size={self.expert_global_batch_size} must "
                                 f"divide global_batch_size={self.global_batch_size} (the experts "
                                 "see the same tokens in proportionally more steps)")
            if self.expert_global_batch_size % self.expert_micro_batch_size():
                raise ValueError(f"expert_global_batch_size={self.expert_global_batch_size} must "
                                 f"be a multiple of micro_batch_size={self.micro_batch_size} (or "
                                 "at most it: the micro batch is then the expert batch)")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"lr={self.lr}, min_lr={self.min_lr}: need lr > 0 and 0 <= min_lr <= lr")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        self.seed_fractions = sorted(set(_float_list(self.seed_fractions, "seed_fractions")))
        if not self.seed_fractions:
            raise ValueError("seed_fractions: empty; give at least one fraction (e.g. [0.5])")
        for f in self.seed_fractions + [self.main_seed_fraction]:
            if not 0.0 <= f < 1.0:
                key = "seed_fractions" if f in self.seed_fractions else "main_seed_fraction"
                raise ValueError(f"{key}: {f} is outside [0, 1) (1 would leave no compute "
                                 "for the experts)")
        if self.main_seed_fraction not in self.seed_fractions:
            raise ValueError(f"main_seed_fraction={self.main_seed_fraction} must be one of "
                             f"seed_fractions={self.seed_fractions}")
        if not self.dense_seeds or len(set(self.dense_seeds)) != len(self.dense_seeds):
            raise ValueError(f"dense_seeds={self.dense_seeds}: need distinct seeds (2+ measure noise)")
        self.topk = sorted(set(self.topk))
        for k in self.topk:
            _positive_int("topk", k)
            if k > n:
                raise ValueError(f"topk: k={k} > number of experts ({n} train_domains)")
        if self.branch_k > n:
            raise ValueError(f"branch_k={self.branch_k} > number of experts ({n} train_domains)")
        if self.removal_domain is None:
            self.removal_domain = self.train_domains[0]
        if self.removal_domain not in self.train_domains:
            raise ValueError(f"removal_domain={self.removal_domain!r}: not one of "
                             f"train_domains {self.train_domains}")
        self.crossover_fractions = sorted(set(_float_list(self.crossover_fractions,
                                                          "crossover_fractions")))
        for c in self.crossover_fractions:
            if not 0 < c or c == 1.0:
                raise ValueError(f"crossover_fractions: {c} must be > 0 and != 1 (1 is the main run)")
        if self.crossover_dense_seeds is not None:
            _positive_int("crossover_dense_seeds", self.crossover_dense_seeds)
            if self.crossover_dense_seeds > len(self.dense_seeds):
                raise ValueError(f"crossover_dense_seeds={self.crossover_dense_seeds} > "
                                 f"{len(self.dense_seeds)} dense_seeds")
        self.seed_corpora = _seed_corpora(self.seed_corpora, self.train_domains)
        for scale in [1.0] + self.crossover_fractions:
            for f in self.seed_fractions if scale == 1.0 else [self.main_seed_fraction]:
                if self.schedule(f, scale)["expert_steps"] < 1:
                    raise ValueError(
                        f"total_tokens={self.total_tokens}: at seed fraction {f} (budget ×{scale}) "
                        f"each of the {n} experts gets < 1 step of {self.tokens_per_step()} tokens; "
                        "raise total_tokens")
        if self.novel_domains and self.novel_steps() < 1:
            raise ValueError(f"novel_tokens={self.novel_tokens}: < 1 step of "
                             f"{self.expert_tokens_per_step()} tokens")

    # ---- derived compute schedule (pure) -----------------------------------------------------
    def tokens_per_step(self) -> int:
        """Tokens of one step of the dense model and the seed."""
        return self.global_batch_size * self.model.seq_length

    def expert_batch_size(self) -> int:
        return self.expert_global_batch_size or self.global_batch_size

    def expert_micro_batch_size(self) -> int:
        return min(self.micro_batch_size, self.expert_batch_size())

    def expert_tokens_per_step(self) -> int:
        return self.expert_batch_size() * self.model.seq_length

    def schedule(self, seed_fraction: float, scale: float = 1.0) -> dict[str, int]:
        """Steps of the seed, of each expert and of the compute-matched dense model. The budget
        is cut in dense steps; an expert's share (whole dense steps) is then counted in its own,
        smaller steps, so its tokens do not depend on expert_global_batch_size."""
        total = int(self.total_tokens * scale) // self.tokens_per_step()
        seed = round(total * seed_fraction)
        expert = (total - seed) // len(self.train_domains)
        return {"seed_steps": seed,
                "expert_steps": expert * self.global_batch_size // self.expert_batch_size(),
                "dense_steps": seed + expert * len(self.train_domains)}

    def crossover_seeds(self) -> list[int]:
        """The dense seeds run at each crossover budget."""
        return self.dense_seeds[:self.crossover_dense_seeds or len(self.dense_seeds)]

    def seed_domains(self, label: str) -> list[str]:
        """The training domains of a seed corpus ("all": every training domain)."""
        spec = self.seed_corpora[label]
        return list(self.train_domains) if spec == "all" else list(spec)

    def novel_steps(self) -> int:
        if self.novel_tokens is not None:
            return self.novel_tokens // self.expert_tokens_per_step()
        return self.schedule(self.main_seed_fraction)["expert_steps"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """{key: default} of the keys that have one (an older plan.json may lack newer keys)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out


def _domains(value: Any, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}={value!r}: must be a list of domain names")
    out = [check_domain(d) for d in value]
    dups = sorted({d for d in out if out.count(d) > 1})
    if dups:
        raise ValueError(f"{key}: duplicate domain(s) {dups}")
    return out


def _seed_corpora(value: Any, train: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"seed_corpora={value!r}: must be a mapping label -> list of training "
                         "domains (or \"all\")")
    out: dict[str, Any] = {}
    for label, spec in value.items():
        check_name(str(label), "seed_corpora label")
        if spec == "all":
            out[str(label)] = "all"
            continue
        doms = _domains(spec, f"seed_corpora.{label}")
        if not doms:
            raise ValueError(f"seed_corpora.{label}: empty; list training domains or \"all\"")
        bad = [d for d in doms if d not in train]
        if bad:
            raise ValueError(f"seed_corpora.{label}: {bad} not in train_domains {train} (the seed "
                             "trains on training domains only)")
        out[str(label)] = "all" if sorted(doms) == sorted(train) else doms
    return out


def _float_list(value: Any, key: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{key}={value!r}: must be a list of numbers")
    return [float(v) for v in value]


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: must be an integer >= 1")


def plan_from_dict(data: dict[str, Any], where: str = "plan") -> ExperimentPlan:
    return _from_dict(ExperimentPlan, data, where)


def check_corpus(plan: ExperimentPlan) -> list[str]:
    """Every domain of the plan has <corpus>/<domain>/{train,valid,test}.jsonl; returns the
    domains available in the corpus."""
    corpus = Path(plan.corpus)
    if not corpus.is_dir():
        raise FileNotFoundError(f"corpus: {corpus} is not a folder (expected "
                                "<domain>/{train,valid,test}.jsonl inside)")
    available = sorted(p.name for p in corpus.iterdir() if (p / "train.jsonl").is_file())
    for key in ("train_domains", "novel_domains"):
        for d in getattr(plan, key):
            if d not in available:
                raise ValueError(f"{key}: domain {d!r} not found in corpus {corpus} "
                                 f"(available: {', '.join(available) or 'none'})")
            for split in SPLITS:
                if not (corpus / d / f"{split}.jsonl").is_file():
                    raise FileNotFoundError(f"{key}: {corpus / d / f'{split}.jsonl'} is missing")
    return available


def load_plan(path: str | Path, *, overrides: list[str] | None = None,
              corpus: str | Path | None = None, check_files: bool = True) -> ExperimentPlan:
    """Read, override (`key.sub=value`), validate. Relative `corpus` paths resolve against the
    plan file's folder (so a plan runs from any working directory)."""
    from megatron_btm.training.config import apply_override
    path = Path(path)
    data = load_yaml(path, "plan file")   # errors name the file (and the line)
    for item in overrides or []:
        apply_override(data, item)
    if corpus is not None:
        data["corpus"] = str(corpus)
    if isinstance(data.get("corpus"), str):
        data["corpus"] = str((path.parent / data["corpus"]).resolve()) \
            if corpus is None else str(Path(corpus).resolve())
    try:
        plan = plan_from_dict(data, str(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if check_files:
        check_corpus(plan)
    return plan
