"""The sections of a run plan (cluster, executor, seed, cycles, evaluation, baseline), each a
keyword-only dataclass whose checks name the plan key, the value and the rule.

Everything that lands in a generated script is either validated to a safe form (numbers, SLURM
time strings, `--option` lines) or quoted by the generator; `cluster.env_setup` lines are shell
code on purpose (module loads, venv activation) and are copied verbatim.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")          # SLURM: [D-]HH[:MM[:SS]]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")      # job names, plan name
_SBATCH_LINE_RE = re.compile(r"^--[a-z][a-z-]*(=[^\n\r]*)?$")


def _bad(key: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"plan key {key!r} = {value!r}: {rule}")


def check_domain(key: str, name: Any) -> None:
    """A domain becomes a folder name, a job-array entry and an argv item: the forest's one rule
    (forest.names: [A-Za-z0-9._-], no '..', not 'seed') applies, checked here so a bad plan
    fails before anything is submitted. The generator quotes every value anyway."""
    from megatron_btm.forest.names import check_domain as forest_rule
    if not isinstance(name, str) or not name:
        raise _bad(key, name, "must be a non-empty string")
    try:
        forest_rule(name)
    except ValueError as e:
        raise _bad(key, name, str(e).split(": ", 1)[-1].replace("is not allowed: ", "")) from None


def _check_abs_path(key: str, value: Any, base: Path | None) -> str:
    if not isinstance(value, str) or not value or "\n" in value or "\0" in value:
        raise _bad(key, value, "must be a non-empty path on one line")
    p = Path(value)
    if not p.is_absolute():
        if base is None:
            raise _bad(key, value, "must be an absolute path (generated scripts run anywhere)")
        p = (base / p).resolve()
    return str(p)


def _pos_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad(key, value, "must be a positive integer")


def _opt_pos_int(key: str, value: Any) -> None:
    if value is not None:
        _pos_int(key, value)


def _time(key: str, value: Any) -> None:
    if not isinstance(value, str) or not _TIME_RE.match(value):
        raise _bad(key, value, "must be a SLURM time limit like '12:00:00' or '2-00:00:00'")


def _overrides(key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _bad(key, value, "must be a mapping of dotted config key -> value")
    for k, v in value.items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", k):
            raise _bad(f"{key}.{k}", k, "override keys are dotted names like train.steps")
        if not isinstance(v, (str, int, float, bool)) or (isinstance(v, str) and "\n" in v):
            raise _bad(f"{key}.{k}", v, "override values are scalars on one line")


@dataclass(kw_only=True)
class ClusterConfig:
    """How each job asks SLURM for resources and prepares its environment."""
    partition: str | None = None       # None: the cluster's default partition
    account: str | None = None
    gpus_per_expert: int = 4           # GPUs per expert job (one node)
    ntasks_per_expert: int | None = None  # srun tasks (= ranks) per expert; None: gpus_per_expert
    cpus_per_task: int = 8
    seed_nodes: int = 1                # the seed trains data-parallel over this many nodes
    seed_ntasks_per_node: int | None = None  # None: gpus_per_expert
    max_concurrent: int = 16           # `%` limit of each cycle's job array
    time_seed: str = "48:00:00"
    time_expert: str = "24:00:00"
    time_stage: str = "02:00:00"       # branch and merge jobs
    master_addr: str = "auto"          # auto: first host of the allocation; or a literal address
    btm_command: str = "btm"           # how jobs call the CLI (after env_setup)
    env_setup: list[str] = field(default_factory=list)   # shell lines, verbatim, at the top
    container_image: str | None = None  # pyxis/enroot: srun --container-image
    container_mounts: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. "--qos=high"

    def __post_init__(self):
        for key in ("partition", "account"):
            v = getattr(self, key)
            if v is not None and not _NAME_RE.match(str(v)):
                raise _bad(f"cluster.{key}", v, "must be a SLURM name ([A-Za-z0-9._-])")
        for key in ("gpus_per_expert", "cpus_per_task", "seed_nodes", "max_concurrent"):
            _pos_int(f"cluster.{key}", getattr(self, key))
        _opt_pos_int("cluster.ntasks_per_expert", self.ntasks_per_expert)
        _opt_pos_int("cluster.seed_ntasks_per_node", self.seed_ntasks_per_node)
        for key in ("time_seed", "time_expert", "time_stage"):
            _time(f"cluster.{key}", getattr(self, key))
        if not re.match(r"^(auto|[A-Za-z0-9.:-]+)$", self.master_addr):
            raise _bad("cluster.master_addr", self.master_addr, "must be 'auto' or a host/IP")
        if not isinstance(self.btm_command, str) or not self.btm_command.strip() or "\n" in self.btm_command:
            raise _bad("cluster.btm_command", self.btm_command, "must be a command on one line")
        for i, line in enumerate(self.env_setup):
            if not isinstance(line, str) or "\n" in line:
                raise _bad(f"cluster.env_setup[{i}]", line, "must be one shell line")
        for i, line in enumerate(self.extra_sbatch):
            if not isinstance(line, str) or not _SBATCH_LINE_RE.match(line):
                raise _bad(f"cluster.extra_sbatch[{i}]", line, "must be one '--option[=value]' line")
        for key in ("container_image", "container_mounts"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not re.match(r"^[^\s'\"`$\\;]+$", v)):
                raise _bad(f"cluster.{key}", v, "must be one word without quotes, '$' or ';'")

    @property
    def expert_ntasks(self) -> int:
        return self.ntasks_per_expert or self.gpus_per_expert

    @property
    def seed_tasks_per_node(self) -> int:
        return self.seed_ntasks_per_node or self.gpus_per_expert


@dataclass(kw_only=True)
class SeedConfig:
    """Step 0: one LM on the mixture of `domains`, or an existing checkpoint (`checkpoint`), or a
    random initialisation (`steps: 0`)."""
    domains: list[str] = field(default_factory=list)
    steps: int | None = None           # None: the training config's own; 0: random init
    checkpoint: str | None = None      # an existing checkpoint starts the forest (no training)
    gpu_hours: float | None = None     # accounting: explicit seed GPU-hours, or ...
    compute_fraction: float | None = None  # ... the seed's share of (seed + first cycle)
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.checkpoint is None and (not isinstance(self.domains, list) or not self.domains) \
                and self.steps != 0:
            raise _bad("seed.domains", self.domains, "must be a non-empty list of domains "
                       "(or give seed.checkpoint)")
        for i, d in enumerate(self.domains):
            check_domain(f"seed.domains[{i}]", d)
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 0):
            raise _bad("seed.steps", self.steps, "must be an integer >= 0 (0: random init)")
        if self.checkpoint is not None and (self.steps or self.domains):
            raise _bad("seed.checkpoint", self.checkpoint, "an existing checkpoint is not trained: "
                       "give seed.checkpoint or seed.domains/steps, not both")
        if self.gpu_hours is not None and self.compute_fraction is not None:
            raise _bad("seed.compute_fraction", self.compute_fraction, "give gpu_hours or compute_fraction, not both")
        if self.gpu_hours is not None and (not isinstance(self.gpu_hours, (int, float)) or self.gpu_hours < 0):
            raise _bad("seed.gpu_hours", self.gpu_hours, "must be a number >= 0")
        if self.compute_fraction is not None and not (
                isinstance(self.compute_fraction, (int, float)) and 0 <= self.compute_fraction < 1):
            raise _bad("seed.compute_fraction", self.compute_fraction, "must be in [0, 1)")
        _overrides("seed.overrides", self.overrides)

    @property
    def trained(self) -> bool:
        return self.checkpoint is None and self.steps != 0


@dataclass(kw_only=True)
class CycleConfig:
    """One BTM cycle: branch, train one expert per domain in parallel, merge."""
    domains: list[str]
    steps: int | None = None            # per expert; None: the training config's own
    gpu_hours_per_expert: float | None = None  # accounting (and the paper's budget unit)
    overrides: dict[str, Any] = field(default_factory=dict)
    index: int = 0                      # 1-based; set by RunPlan

    def validate(self, key: str) -> None:
        if not isinstance(self.domains, list) or not self.domains:
            raise _bad(f"{key}.domains", self.domains, "must be a non-empty list of domains")
        for i, d in enumerate(self.domains):
            check_domain(f"{key}.domains[{i}]", d)
        _opt_pos_int(f"{key}.steps", self.steps)
        g = self.gpu_hours_per_expert
        if g is not None and (not isinstance(g, (int, float)) or isinstance(g, bool) or g < 0):
            raise _bad(f"{key}.gpu_hours_per_expert", g, "must be a number >= 0")
        _overrides(f"{key}.overrides", self.overrides)


@dataclass(kw_only=True)
class EvaluationConfig:
    """Domains the finished forest is scored on by a last job (`btm eval`); none: no eval job.
    They must be preprocessed in data_dir like the training domains."""
    domains: list[str] = field(default_factory=list)
    split: str = "test"
    modes: list[str] = field(default_factory=lambda: ["uniform"])   # ensemble rows (cached needs priors)
    topk: list[int] = field(default_factory=lambda: [1, 2])
    max_blocks: int | None = None      # per domain; None: the whole split
    clusters: str | None = None        # a `btm cluster fit` folder: adds the cluster-routing rows
    cluster_temperature: float = 0.1   # (ensemble/cluster, top<k>/cluster); expert id = cluster name

    def __post_init__(self):
        t = self.cluster_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise _bad("evaluation.cluster_temperature", t, "must be a number > 0")
        for i, d in enumerate(self.domains):
            check_domain(f"evaluation.domains[{i}]", d)
        if self.split not in ("valid", "test"):
            raise _bad("evaluation.split", self.split, "must be 'valid' or 'test'")
        for i, m in enumerate(self.modes):
            if m not in ("uniform", "uniform-fixed"):
                raise _bad(f"evaluation.modes[{i}]", m, "valid modes: uniform, uniform-fixed "
                           "(cached-prior rows need `btm prior` first)")
        for i, k in enumerate(self.topk):
            _pos_int(f"evaluation.topk[{i}]", k)
        _opt_pos_int("evaluation.max_blocks", self.max_blocks)


@dataclass(kw_only=True)
class BaselineConfig:
    """The dense model the forest is compared with (accounting only)."""
    reference_gpu_hours: float | None = None   # e.g. the paper's dense 1.3B: 6144
    reference_gpus: int | None = None          # e.g. 128

    def __post_init__(self):
        if self.reference_gpu_hours is not None and not (
                isinstance(self.reference_gpu_hours, (int, float)) and self.reference_gpu_hours > 0):
            raise _bad("baseline.reference_gpu_hours", self.reference_gpu_hours, "must be a number > 0")
        _opt_pos_int("baseline.reference_gpus", self.reference_gpus)


EXECUTORS = ("inprocess", "local", "slurm")


@dataclass(kw_only=True)
class ExecutorConfig:
    """Where the stage graph runs (the graph and its rules are the same for every executor)."""
    kind: str = "local"                # inprocess: this process; local: subprocesses; slurm: sbatch
    parallel: int = 1                  # local: nodes run at the same time
    ntasks: int = 1                    # local: ranks per training node (torchrun when > 1);
                                       # SLURM jobs take theirs from the cluster section

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise _bad("executor.kind", self.kind, f"valid executors: {', '.join(EXECUTORS)}")
        _pos_int("executor.parallel", self.parallel)
        _pos_int("executor.ntasks", self.ntasks)


