"""GPU-hour accounting of a plan: per stage, in total, and the compute-matched dense baseline.

Pure arithmetic over the plan's budgets. Units: GPU-hours. The seed's budget is either given
(`seed.gpu_hours`) or a fraction f of (seed + first cycle), the way the paper allocates it:
seed = f / (1 - f) · cycle_1. A dense baseline is compute-matched when it gets the same total
GPU-hours (at equal per-GPU throughput: the same tokens); it needs every GPU at once and
synchronises all of them each step, while BTM experts run independently.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megatron_btm.pipeline.plan import RunPlan


@dataclass(kw_only=True)
class StageCost:
    stage: str
    experts: int
    gpu_hours_per_expert: float | None
    gpu_hours: float | None
    gpus_at_once: int
    wall_hours: float | None


@dataclass(kw_only=True)
class PlanCost:
    plan: str
    stages: list[StageCost] = field(default_factory=list)
    total_gpu_hours: float | None = None
    seed_share: float | None = None          # seed / total
    dense_matched_gpu_hours: float | None = None
    dense_matched_wall_hours: float | None = None   # on reference_gpus (or the forest's peak)
    reference_gpu_hours: float | None = None
    fraction_of_reference: float | None = None
    wall_hours: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan_cost(plan: RunPlan) -> PlanCost:
    cl = plan.cluster
    out = PlanCost(plan=plan.name, reference_gpu_hours=plan.baseline.reference_gpu_hours)
    cycles = []
    for cycle in plan.cycles:
        n, g = len(cycle.domains), cycle.gpu_hours_per_expert
        waves = math.ceil(n / cl.max_concurrent)   # the `%` limit runs the array in waves
        gpus = min(n, cl.max_concurrent) * cl.gpus_per_expert
        cycles.append(StageCost(stage=f"cycle {cycle.index}", experts=n, gpu_hours_per_expert=g,
                                gpu_hours=None if g is None else n * g, gpus_at_once=gpus,
                                wall_hours=None if g is None else waves * g / cl.gpus_per_expert))
    seed_gpus = cl.seed_nodes * cl.gpus_per_expert
    seed = plan.seed
    seed_h = seed.gpu_hours if seed else 0.0   # an existing forest: its seed is already paid for
    if seed_h is None and seed.compute_fraction is not None and cycles[0].gpu_hours is not None:
        f = seed.compute_fraction
        seed_h = f / (1 - f) * cycles[0].gpu_hours
    seed = StageCost(stage="seed", experts=1, gpu_hours_per_expert=seed_h, gpu_hours=seed_h,
                     gpus_at_once=seed_gpus, wall_hours=None if seed_h is None else seed_h / seed_gpus)
    out.stages = [seed, *cycles]
    if all(s.gpu_hours is not None for s in out.stages):
        total = sum(s.gpu_hours for s in out.stages)
        out.total_gpu_hours = total
        out.wall_hours = sum(s.wall_hours for s in out.stages)
        out.seed_share = seed_h / total if total else None
        out.dense_matched_gpu_hours = total
        dense_gpus = plan.baseline.reference_gpus or max(s.gpus_at_once for s in out.stages)
        out.dense_matched_wall_hours = total / dense_gpus
        if out.reference_gpu_hours:
            out.fraction_of_reference = total / out.reference_gpu_hours
    return out


def _fmt(x: float | None, nd: int = 1) -> str:
    return "?" if x is None else f"{x:,.{nd}f}"


def format_cost(cost: PlanCost) -> str:
    rows = [f"GPU-hour accounting for plan {cost.plan!r}",
            f"{'stage':<10} {'experts':>7} {'GPU-h/expert':>13} {'GPU-h':>10} {'GPUs at once':>13} {'wall h':>8}"]
    for s in cost.stages:
        rows.append(f"{s.stage:<10} {s.experts:>7} {_fmt(s.gpu_hours_per_expert):>13} {_fmt(s.gpu_hours):>10} "
                    f"{s.gpus_at_once:>13} {_fmt(s.wall_hours):>8}")
    rows.append(f"{'total':<10} {sum(s.experts for s in cost.stages[1:]):>7} {'':>13} "
                f"{_fmt(cost.total_gpu_hours):>10} {'':>13} {_fmt(cost.wall_hours):>8}")
    if cost.total_gpu_hours is None:
        rows.append("(some stage has no budget: set seed.gpu_hours / compute_fraction and "
                    "cycles[*].gpu_hours_per_expert)")
        return "\n".join(rows) + "\n"
    rows.append(f"seed share of total: {cost.seed_share:.1%}")
    rows.append(f"compute-matched dense baseline: {_fmt(cost.dense_matched_gpu_hours)} GPU-h "
                f"({_fmt(cost.dense_matched_wall_hours)} h wall-clock)")
    if cost.reference_gpu_hours:
        rows.append(f"reference dense model: {_fmt(cost.reference_gpu_hours)} GPU-h; the forest uses "
                    f"{cost.fraction_of_reference:.1%} of it")
    return "\n".join(rows) + "\n"
