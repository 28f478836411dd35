"""The mixture-of-experts stages of a run plan (issue 16): the plan's `moe:` section, its graph
nodes, their bodies, the eval node's MoE rows and the SLURM jobs.

    ... cycle<last>-merge ─> merge-moe ─┬─> train-moe-<name> ─┐
                                        └─> train-moe-<name> ─┴─> eval (+ rows moe/<run>/top<k>)

`merge-moe` merges the forest after the last cycle (`moe.merge.merge_moe`, the library behind
`btm merge-moe`) into run_dir/moe/merged; each `train-moe-<name>` trains that checkpoint
(`stages.train_moe.train_moe`, behind `btm train-moe`) in run_dir/moe/<name>, resumable by the
loop like every run (a requeued node continues from its latest checkpoint). Its training config
is the plan's, with the model section over the checkpoint's model_config (as `btm train-moe
--config`), then the plan-wide overrides < the run's < its steps and lr. The eval node scores
the merged checkpoint (rows moe/merged/top<k>) and each trained run (moe/<name>/top<k>) through
`btm eval --moe`'s code path. No `moe:` section: no node, and the graph is the one without it.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline.sections import _NAME_RE, _bad, _opt_pos_int, _overrides, _pos_int, check_domain

MODES = ("router-only", "full")   # stages.train_moe.MODES (not imported: it would not import torch,
ROUTERS = ("hidden", "random")    # but the plan must load without the stage modules)
MERGED = "merged"                 # the merge's run folder name and eval row name


@dataclass(kw_only=True)
class MoeTrainRun:
    """One `train-moe` node: the merged MoE trained on a domain mixture."""
    mode: str                          # router-only | full
    name: str | None = None            # node train-moe-<name>, folder moe/<name>; default: mode
    steps: int | None = None           # None: the training config's own
    domains: list[str] | None = None   # None: the merged experts' domains
    weights: dict[str, float] | None = None   # mixture weights per domain (default 1 each)
    lr: float | None = None            # peak learning rate (= optim.lr)
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        if self.mode not in MODES:
            raise _bad(f"{key}.mode", self.mode, f"valid modes: {', '.join(MODES)}")
        self.name = self.mode if self.name is None else self.name
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name) or self.name == MERGED:
            raise _bad(f"{key}.name", self.name, f"must match [A-Za-z0-9][A-Za-z0-9._-]* and not "
                       f"be {MERGED!r} (it names a folder and a node)")
        _opt_pos_int(f"{key}.steps", self.steps)
        if self.domains is not None:
            if not isinstance(self.domains, list) or not self.domains:
                raise _bad(f"{key}.domains", self.domains, "must be a non-empty list of domains")
            for i, d in enumerate(self.domains):
                check_domain(f"{key}.domains[{i}]", d)
        if self.weights is not None:
            if not isinstance(self.weights, dict) or not self.weights:
                raise _bad(f"{key}.weights", self.weights, "must be a mapping domain -> weight")
            for d, w in self.weights.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                    raise _bad(f"{key}.weights.{d}", w, "must be a number > 0")
                if self.domains is not None and d not in self.domains:
                    raise _bad(f"{key}.weights.{d}", w, f"not one of the run's domains {self.domains}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0):
            raise _bad(f"{key}.lr", self.lr, "must be a number > 0")
        _overrides(f"{key}.overrides", self.overrides)

    def stage_overrides(self, plan) -> list[str]:
        """`key=value` for this run: plan-wide < the run's own < steps and lr."""
        merged = {**plan.overrides, **self.overrides, **({"steps": self.steps} if self.steps else {}),
                  **({"optim.lr": self.lr} if self.lr is not None else {})}
        return [f"{k}={'true' if v is True else 'false' if v is False else v}" for k, v in merged.items()]


@dataclass(kw_only=True)
class MoeConfig:
    """The plan's `moe:` section: merge the finished forest into one MoE, then train it."""
    experts: list[str] | None = None   # expert ids in MoE order; None: every expert of the forest
    shared: str = "uniform"            # averaged (non-MLP) parameters: uniform | posterior:PRIOR
    router: str = "hidden"             # router rows: hidden (each domain's mean MLP input) | random
    topk: int = 2                      # experts active per token
    seed: int = 0                      # of router: random
    split: str = "valid"               # router: hidden samples this split ...
    num_sequences: int = 16            # ... this many blocks per domain
    eval_topk: list[int] = field(default_factory=lambda: [1, 2])   # the eval node's MoE rows
    train: list[Any] = field(default_factory=list)   # MoeTrainRun mappings, one train-moe node each

    def __post_init__(self):
        from megatron_btm.utils.config import from_dict
        if self.experts is not None:
            if not isinstance(self.experts, list) or not self.experts:
                raise _bad("moe.experts", self.experts, "must be a non-empty list of expert ids")
            for i, e in enumerate(self.experts):
                check_domain(f"moe.experts[{i}]", e)
            if len(set(self.experts)) != len(self.experts):
                raise _bad("moe.experts", self.experts, "an expert is named twice")
        if self.shared != "uniform" and not (isinstance(self.shared, str) and
                                             self.shared.startswith("posterior:") and self.shared[10:]):
            raise _bad("moe.shared", self.shared, "must be 'uniform' or 'posterior:PRIOR.json'")
        if self.router not in ROUTERS:
            raise _bad("moe.router", self.router, f"valid routers: {', '.join(ROUTERS)}")
        for key in ("topk", "num_sequences"):
            _pos_int(f"moe.{key}", getattr(self, key))
        if self.split not in ("valid", "test", "train"):
            raise _bad("moe.split", self.split, "must be 'valid', 'test' or 'train'")
        if not isinstance(self.eval_topk, list) or not self.eval_topk:
            raise _bad("moe.eval_topk", self.eval_topk, "must be a non-empty list of k")
        for i, k in enumerate(self.eval_topk):
            _pos_int(f"moe.eval_topk[{i}]", k)
        if not isinstance(self.train, list):
            raise _bad("moe.train", self.train, "must be a list of runs {mode, steps, domains, ...}")
        runs = []
        for i, run in enumerate(self.train):
            key = f"moe.train[{i}]"
            if not isinstance(run, MoeTrainRun):   # a mapping of the YAML (or of plan.json)
                run = from_dict(MoeTrainRun, run, f"plan key {key!r}")
            run.validate(key)
            if run.name in {r.name for r in runs}:
                raise _bad(f"{key}.name", run.name, "a run of this name is already in moe.train "
                           "(give each run its own name)")
            runs.append(run)
        self.train = runs

    def check_plan(self, plan) -> None:
        """What the plan itself decides: the experts a plan with its own forest has, top-k."""
        n = len(self.experts) if self.experts else None
        if plan.forest is None:   # the run's own forest: its experts are the plan's domains
            known = plan.all_domains()
            for i, e in enumerate(self.experts or []):
                if e not in known:
                    raise _bad(f"moe.experts[{i}]", e, f"not an expert of this plan's forest "
                               f"(its experts: {', '.join(known)})")
            n = n or len(known)
        if n is not None:
            if self.topk > n:
                raise _bad("moe.topk", self.topk, f"larger than the {n} experts merged")
            for i, k in enumerate(self.eval_topk):
                if k > n:
                    raise _bad(f"moe.eval_topk[{i}]", k, f"larger than the {n} experts merged")

    def run(self, name: str) -> MoeTrainRun:
        return next(r for r in self.train if r.name == name)


# ---- layout and nodes ------------------------------------------------------------------------
def merged_dir() -> str:
    return f"moe/{MERGED}"


def train_dir(name: str) -> str:
    return f"moe/{name}"


def train_id(name: str) -> str:
    return f"{G.TRAIN_MOE}-{name}"


def build_nodes(plan, after: str) -> list[G.Node]:
    """merge-moe after `after` (the last cycle's merge), a train-moe node per run after it."""
    merge = G.Node(id=G.MERGE_MOE, kind=G.MERGE_MOE, inputs=(after,), outputs=(merged_dir(),))
    return [merge] + [G.Node(id=train_id(r.name), kind=G.TRAIN_MOE, inputs=(merge.id,),
                             outputs=(train_dir(r.name),)) for r in plan.moe.train]


# ---- bodies: (plan, node) -> info for the done-record ----------------------------------------
def _path(plan, rel: str) -> Path:
    return Path(plan.run_dir) / rel


def merge_body(plan, node: G.Node) -> dict[str, Any]:
    from megatron_btm.moe.merge import MergeMoeConfig, merge_moe
    m, out = plan.moe, _path(plan, merged_dir())
    if out.exists():   # written by an attempt killed before its done-record: merge again
        shutil.rmtree(out)
    summary = merge_moe(MergeMoeConfig(
        forest=str(_path(plan, G.forest_root(plan))), output=str(out), experts=m.experts,
        shared=m.shared, router=m.router, topk=m.topk, seed=m.seed, data=plan.data_dir,
        split=m.split, num_sequences=m.num_sequences, progress=False))
    return {"checkpoint": str(out), "experts": summary["experts"], "router": m.router, "topk": m.topk}


def train_config(plan, run: MoeTrainRun, model_config: dict[str, Any]):
    """The plan's training config with its model section over `model_config` (the parent's),
    then the run's overrides: what `btm train-moe --config` composes."""
    from megatron_btm.training.config import TrainConfig, apply_override
    data = plan.train_dict()
    data["model"] = {**model_config, **(data.get("model") or {})}
    for item in run.stage_overrides(plan):
        apply_override(data, item)
    return TrainConfig.from_dict(data)


def train_body(plan, node: G.Node) -> dict[str, Any]:
    from megatron_btm.stages.train_moe import read_parent, train_moe
    run = plan.moe.run(node.id.removeprefix(f"{G.TRAIN_MOE}-"))
    ckpt, parent = read_parent(_path(plan, merged_dir()))
    domains = run.domains or list(dict.fromkeys((parent.get("moe_merge") or {}).get("domains") or []))
    unknown = sorted(set(run.weights or {}) - set(domains))
    if unknown:
        raise ValueError(f"plan key 'moe.train' run {run.name!r}: weights for {unknown}, not among "
                         f"its domains {domains}")
    res = train_moe(train_config(plan, run, parent["model_config"]), checkpoint=ckpt,
                    data_dir=plan.data_dir, domains=domains, output_dir=_path(plan, train_dir(run.name)),
                    mode=run.mode, weights=run.weights, resume="auto")
    return {"steps": res.step, "tokens": res.tokens}


BODIES = {G.MERGE_MOE: merge_body, G.TRAIN_MOE: train_body}


def eval_models(plan) -> tuple[dict[str, Path], list[int]]:
    """The eval node's `moe_models` / `moe_topk` (forest_eval.evaluate_forest, `btm eval --moe`):
    the merged checkpoint and each trained run; none without a moe section."""
    if plan.moe is None:
        return {}, [1, 2]
    models = {MERGED: _path(plan, merged_dir())}
    models.update({r.name: _path(plan, train_dir(r.name)) for r in plan.moe.train})
    return models, list(plan.moe.eval_topk)


def check_training(plan) -> None:
    """Before anything runs: each run's overrides compose (on the plan's own model section; the
    merged checkpoint's model_config replaces it at run time) and a posterior prior exists."""
    for i, run in enumerate(plan.moe.train):
        try:
            train_config(plan, run, {})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{plan.source or 'plan'}: training config for moe.train[{i}] "
                             f"(with {run.stage_overrides(plan)}): {e}") from None
    if plan.moe.shared != "uniform" and not Path(plan.moe.shared[10:]).is_file():
        raise FileNotFoundError(f"plan key 'moe.shared' = {plan.moe.shared!r}: prior not found")


# ---- SLURM: one job merges, one job per train run, after the last cycle's merge -------------
def slurm_jobs(plan, after: str) -> list:
    from megatron_btm.pipeline import sbatch as S
    cl, pre = plan.cluster, f"{len(plan.cycles) + 1:02d}"
    lines = S._header(plan, "moe-merge", "merge the forest into one mixture-of-experts checkpoint",
                      nodes=1, ntasks_per_node=1, gpus_per_node=1, time=cl.time_stage)
    lines += ["", f"# FFNs -> experts, the rest averaged ({plan.moe.shared}); router {plan.moe.router}",
              S._node(plan.run_dir, G.MERGE_MOE), ""]
    jobs = [S.Job(key=G.MERGE_MOE, script=f"{pre}-moe-merge.sbatch", text="\n".join(lines),
                  after=[after], nodes=[G.MERGE_MOE])]
    for run in plan.moe.train:
        lines = S._header(plan, f"moe-{run.name}", f"train the merged MoE ({run.mode})", nodes=1,
                          ntasks_per_node=cl.expert_ntasks, gpus_per_node=cl.gpus_per_expert,
                          time=cl.time_expert)
        lines += S._rendezvous(plan)
        lines += ["", "# Train (a requeued job continues from the run's latest complete checkpoint)",
                  f"{S._srun(plan, cl.expert_ntasks, cl.expert_ntasks)} "
                  f"{S._node(plan.run_dir, train_id(run.name))}", ""]
        jobs.append(S.Job(key=train_id(run.name), script=f"{pre}-moe-train-{run.name}.sbatch",
                          text="\n".join(lines), after=[G.MERGE_MOE], nodes=[train_id(run.name)]))
    return jobs
