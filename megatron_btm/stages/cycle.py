"""One BTM cycle over an existing forest: a one-cycle run plan on the local executor.

`btm cycle` builds the plan (the forest to extend, the domains, the training config, the
branch policy) and runs its stage graph — branch[d] → train[d] → merge — with the rules every
executor shares (pipeline/nodes.py): the merge runs only when every expert succeeded, the cycle
index is fixed when the work folder's plan is first written, and a rerun on the same work
folder resumes (finished experts are not retrained).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_btm.stages.branch import BranchConfig


def cycle_plan(forest_root: str | Path, *, domains: list[str], data_dir: str | Path,
               work_dir: str | Path, config: str | None = None, overrides: list[str] | None = None,
               branch_cfg: BranchConfig | None = None, cycle: int | None = None):
    import dataclasses

    from megatron_btm.forest import Forest
    from megatron_btm.pipeline.nodes import plan_file
    from megatron_btm.pipeline.plan import plan_from_dict
    from megatron_btm.utils.io import read_json
    work_dir = Path(work_dir).resolve()
    frozen = plan_file(work_dir)
    if cycle is None and frozen.is_file():
        cycle = read_json(frozen)["first_cycle"]   # a rerun keeps the cycle it started as
    experts = Forest.open(forest_root).experts()
    if cycle is None:
        cycle = 1 + max([e.cycle for e in experts], default=0)
    if not frozen.is_file():
        have = {e.domain for e in experts}
        taken = [d for d in domains if d in have]
        if taken:   # refused now, not after training: an expert cannot be its own parent
            raise ValueError(f"--domains: {taken} already have an expert in {forest_root}; "
                             "choose new domains (or remove the old expert first)")
    from megatron_btm.utils.config import load_yaml, parse_override
    train: dict[str, Any] = {}
    if config is not None:
        data = load_yaml(config, "--config training config")
        train = data.get("train", data)
    sets = {".".join(parts): value for parts, value in map(parse_override, overrides or [])}
    raw = {"name": "cycle", "run_dir": str(work_dir), "data_dir": str(Path(data_dir).resolve()),
           "forest": str(Path(forest_root).resolve()), "first_cycle": cycle, "train": train,
           "overrides": sets, "cycles": [{"domains": list(domains)}],
           "branch": dataclasses.asdict(branch_cfg or BranchConfig())}
    return plan_from_dict(raw)


def run_cycle(forest_root: str | Path, *, domains: list[str], data_dir: str | Path,
              work_dir: str | Path, config: str | None = None, overrides: list[str] | None = None,
              branch_cfg: BranchConfig | None = None, parallel: int = 1, cycle: int | None = None,
              log=print) -> list[str]:
    """Run one cycle; returns the merged expert ids. Raises NodeFailed if an expert failed
    (nothing is merged then; rerun to retry: finished experts are not retrained)."""
    from megatron_btm.forest import Forest
    from megatron_btm.pipeline.run import execute
    if parallel < 1:
        raise ValueError(f"parallel={parallel}: must be >= 1")
    plan = cycle_plan(forest_root, domains=domains, data_dir=data_dir, work_dir=work_dir,
                      config=config, overrides=overrides, branch_cfg=branch_cfg, cycle=cycle)
    execute(plan, executor="local", parallel=parallel, log=log)
    forest = Forest.open(forest_root)
    return [e.id for e in forest.experts() if e.cycle == plan.first_cycle]
