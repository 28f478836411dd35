"""The run plan: one BTM run — data, training config, seed, cycles, branch policy, evaluation,
and where it runs (executor: in-process, local subprocesses, SLURM).

Loaded from YAML into keyword-only dataclasses (the sections are in sections.py); every user
value is checked once, at construction, with a ValueError that names the key
(`cycles[2].domains[5]`), the value and the rule; `check_training` composes every stage's
training config before anything runs.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btm.pipeline.cost import CostConfig
from megatron_btm.pipeline.moe_nodes import MoeConfig
from megatron_btm.pipeline.sections import (EXECUTORS, BaselineConfig, ClusterConfig,  # noqa: F401
                                             CycleConfig, EvaluationConfig, ExecutorConfig,
                                             SeedConfig, _bad, _check_abs_path, _NAME_RE,
                                             _overrides, _pos_int)
from megatron_btm.stages.branch import BranchConfig
from megatron_btm.utils.config import from_dict, load_yaml

@dataclass(kw_only=True)
class RunPlan:
    name: str
    run_dir: str                       # everything the run writes: forest, branches, experts, logs
    data_dir: str                      # `btm preprocess` output
    train_config: str | None = None    # model + optimizer + steps (YAML for btm train-*), or ...
    train: dict[str, Any] | None = None  # ... inline
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    seed: SeedConfig | None = None     # required unless the plan extends an existing `forest`
    cycles: list[CycleConfig]
    branch: BranchConfig = field(default_factory=BranchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    cost: CostConfig = field(default_factory=CostConfig)   # throughput for `btm plan cost`
    moe: MoeConfig | None = None       # merge the finished forest into one MoE and train it
    overrides: dict[str, Any] = field(default_factory=dict)   # for every training command
    forest: str | None = None          # extend this existing forest (no seed stage), or None:
    first_cycle: int = 1               # the run's own forest, run_dir/forest; cycles count from here
    source: str | None = None          # the YAML file it came from (for error messages)

    def __post_init__(self):
        _pos_int("first_cycle", self.first_cycle)
        if self.forest is None and self.seed is None:
            raise ValueError("plan key 'seed': required (or `forest`: an existing forest to extend)")
        if self.forest is not None and self.seed is not None:
            raise _bad("forest", self.forest, "an existing forest has its seed: leave out the "
                       "seed section")
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise _bad("name", self.name, "must match [A-Za-z0-9][A-Za-z0-9._-]* (it names the SLURM jobs)")
        if not isinstance(self.cycles, list) or not self.cycles:
            raise _bad("cycles", self.cycles, "must be a non-empty list of cycles")
        seen: dict[str, str] = {}
        for c, cycle in enumerate(self.cycles, start=self.first_cycle):
            cycle.index = c
            cycle.validate(f"cycles[{c - self.first_cycle}]")
            for i, d in enumerate(cycle.domains):
                key = f"cycles[{c - self.first_cycle}].domains[{i}]"
                if d in seen:   # one expert per domain: a second one would overwrite its run dir
                    raise _bad(key, d, f"domain already trained at {seen[d]}")
                seen[d] = key
        _overrides("overrides", self.overrides)
        if self.train is not None:
            if not isinstance(self.train, dict):
                raise _bad("train", self.train, "must be a mapping (a training config)")
            if self.train_config is not None:
                raise _bad("train", "...", "give train_config or an inline train section, not both")
        elif self.train_config is None:
            raise ValueError("plan key 'train_config': required (or an inline 'train' section)")
        if self.moe is not None:
            self.moe.check_plan(self)

    @property
    def forest_dir(self) -> str:
        return self.forest or f"{self.run_dir}/forest"

    def cycle(self, index: int) -> CycleConfig:
        return self.cycles[index - self.first_cycle]

    def all_domains(self) -> list[str]:
        return [d for cycle in self.cycles for d in cycle.domains]

    def train_dict(self) -> dict[str, Any]:
        """The training config as a mapping (the inline section, or the file's `train:`)."""
        if self.train is not None:
            return copy.deepcopy(self.train)
        data = load_yaml(self.train_config, "plan key 'train_config': training config")
        return data.get("train", data)

    def stage_overrides(self, stage: str) -> list[str]:
        """`key=value` strings for a stage: plan-wide < the stage's own < its steps."""
        if stage == "seed":
            own, steps = self.seed.overrides, self.seed.steps
        else:
            cycle = self.cycle(int(stage.removeprefix("cycle")))
            own, steps = cycle.overrides, cycle.steps
        merged = {**self.overrides, **own, **({"steps": steps} if steps else {})}
        return [f"{k}={'true' if v is True else 'false' if v is False else v}" for k, v in merged.items()]

    def train_config_for(self, stage: str):
        """The TrainConfig of a stage ("seed" or "cycle<c>"), composed once, here."""
        from megatron_btm.training.config import TrainConfig, apply_override
        data = self.train_dict()
        for item in self.stage_overrides(stage):
            apply_override(data, item)
        return TrainConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The resolved plan (inline training config, absolute paths): what a run freezes."""
        out = dataclasses.asdict(self)
        out.pop("source")
        out["train"], out["train_config"] = self.train_dict(), None
        for c in out["cycles"]:
            c.pop("index")
        if out["moe"] is None:   # plans without the section freeze what they froze before it
            out.pop("moe")
        return out


_SECTIONS = {"cluster": ClusterConfig, "executor": ExecutorConfig, "seed": SeedConfig,
             "branch": BranchConfig, "evaluation": EvaluationConfig, "baseline": BaselineConfig, "cost": CostConfig,
             "moe": MoeConfig}


def _build(cls, key: str, raw: Any):
    """One section through the project's one dataclass builder; errors keep the plan key."""
    try:
        return from_dict(cls, raw, f"plan key {key!r}" if key else "plan")
    except (ValueError, TypeError) as e:
        msg = str(e)
        if key and "plan key" not in msg:   # a section's own check (e.g. stages.branch)
            msg = f"plan key {key!r}: {msg}"
        raise ValueError(msg) from None


def plan_from_dict(raw: Any, *, base_dir: Path | None = None, source: str | None = None) -> RunPlan:
    """Build and validate a plan. Relative paths resolve against `base_dir` (the YAML's folder)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source or 'plan'}: the top level must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    for key in ("run_dir", "data_dir", "train_config", "forest"):
        if raw.get(key) is not None:
            raw[key] = _check_abs_path(key, raw[key], base_dir)
    if isinstance(raw.get("seed"), dict) and raw["seed"].get("checkpoint") is not None:
        raw["seed"] = {**raw["seed"], "checkpoint": _check_abs_path("seed.checkpoint",
                                                                    raw["seed"]["checkpoint"], base_dir)}
    for sec in ("evaluation", "branch"):   # cluster routing: a `btm cluster fit` folder
        if isinstance(raw.get(sec), dict) and raw[sec].get("clusters") is not None:
            raw[sec] = {**raw[sec], "clusters": _check_abs_path(f"{sec}.clusters",
                                                                raw[sec]["clusters"], base_dir)}
    # run_dir also appears in `#SBATCH --output=` lines, which cannot be quoted.
    if "run_dir" in raw and not re.match(r"^[A-Za-z0-9_./+@:=-]+$", raw["run_dir"]):
        raise _bad("run_dir", raw["run_dir"], "must not contain whitespace, quotes, '%' or shell characters "
                   "(it is written into #SBATCH --output lines)")
    sections = {k: _build(cls, k, raw.pop(k)) for k, cls in _SECTIONS.items()
                if raw.get(k) is not None}
    if "cycles" in raw:
        cycles = raw.pop("cycles")
        if not isinstance(cycles, list) or not cycles:
            raise _bad("cycles", cycles, "must be a non-empty list of cycles")
        raw["cycles"] = [_build(CycleConfig, f"cycles[{i}]", c) for i, c in enumerate(cycles)]
    for key in ("source",):
        raw.pop(key, None)
    moe = sections.get("moe")
    if moe is not None and moe.shared.startswith("posterior:"):   # the prior: relative to the file
        moe.shared = "posterior:" + _check_abs_path("moe.shared", moe.shared[10:], base_dir)
    try:
        plan = _build(RunPlan, "", {**raw, **sections})
    except ValueError as e:
        raise ValueError(f"{source}: {e}" if source else str(e)) from None
    plan.source = source
    return plan


def load_plan(path: str | Path) -> RunPlan:
    path = Path(path)
    raw = load_yaml(path, "plan file")   # errors name the file (and the line)
    try:
        return plan_from_dict(raw, base_dir=path.resolve().parent, source=str(path))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def check_training(plan: RunPlan) -> None:
    """Compose the training config of every stage the way the stage will, so a bad config or
    override fails before anything runs or is submitted, not hours later in a job; and check
    that the data is there."""
    stages = (["seed"] if plan.seed and plan.seed.trained else []) + [f"cycle{c.index}" for c in plan.cycles]
    for stage in stages:
        key = "seed" if stage == "seed" else f"cycles[{int(stage[5:]) - plan.first_cycle}]"
        try:
            plan.train_config_for(stage)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{plan.source or 'plan'}: training config for {key} "
                             f"(with {plan.stage_overrides(stage)}): {e}") from None
    data = Path(plan.data_dir)
    if not (data / "tokenizer.json").is_file():
        raise FileNotFoundError(f"plan key 'data_dir' = {plan.data_dir!r}: no tokenizer.json there "
                                "(run `btm preprocess` first)")
    if plan.forest is not None and not (Path(plan.forest) / "forest.json").is_file():
        raise FileNotFoundError(f"plan key 'forest' = {plan.forest!r}: no forest.json there")
    for key, sec in (("evaluation.clusters", plan.evaluation), ("branch.clusters", plan.branch)):
        if sec.clusters is not None:   # loads it: a missing folder or another version fails here
            from megatron_btm.routing.cluster_cli import load_router
            load_router(sec.clusters, sec.cluster_temperature, f"plan key {key!r} =")
    if plan.seed and plan.seed.checkpoint is not None and not Path(plan.seed.checkpoint).exists():
        raise FileNotFoundError(f"plan key 'seed.checkpoint' = {plan.seed.checkpoint!r}: not found")
    if plan.moe is not None:
        from megatron_btm.pipeline.moe_nodes import check_training as check_moe
        check_moe(plan)
    _check_tokenizer(plan, data)


def _check_tokenizer(plan: RunPlan, data: Path) -> None:
    """The data's tokenizer is the forest's (a plan extending one), the seed checkpoint's and the
    one its report.json records: refused now, not when train-expert starts."""
    from megatron_btm.data import identity
    from megatron_btm.utils.io import read_json
    try:
        own = identity.tokenizer_of(data)
    except ValueError:   # not loadable: the stage that reads the data says so, with the file
        return
    sides = [(f"plan key 'data_dir' ({data / 'tokenizer.json'})", own)]
    report = data / "report.json"
    if report.is_file():
        try:
            sha = (read_json(report).get("tokenizer") or {}).get("sha256")
        except (ValueError, OSError, AttributeError):
            sha = None
        sides.append((f"the data's report ({report})", sha if isinstance(sha, str) else None))
    if plan.forest is not None:
        sides.append((f"plan key 'forest' ({Path(plan.forest) / 'forest.json'})",
                      identity.forest_tokenizer(plan.forest)))
    if plan.seed and plan.seed.checkpoint is not None:
        sides.append((f"plan key 'seed.checkpoint' ({Path(plan.seed.checkpoint) / 'meta.json'})",
                      identity.checkpoint_tokenizer(plan.seed.checkpoint)))
    identity.check_same_tokenizer(*sides)
