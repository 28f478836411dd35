"""GPU-hour accounting of a plan: per stage, in total, and the compute-matched dense baseline.

Pure arithmetic over the plan's budgets. Units: GPU-hours. A stage's budget is, first, what the
plan states (`cycles[*].gpu_hours_per_expert`, `seed.gpu_hours`); else, with a `cost:` section,
its tokens (steps × global batch × sequence length of the stage's training config) at a
throughput per GPU: stated (`tokens_per_second_per_gpu`, e.g. measured) or derived from
`peak_tflops` × `mfu` at 6 · parameters FLOPs per token (the communication model's compute
time); plus `job_overhead_s` per job (startup, checkpoint I/O). A job computes on its ranks
(`cluster.ntasks_per_expert`) and is charged the GPUs it holds. Else the seed is a fraction f of
(seed + first cycle), the way the paper allocates it: seed = f / (1 - f) · cycle_1. A dense
baseline is compute-matched when it gets the same total GPU-hours (at equal per-GPU
throughput: the same tokens); it needs every GPU at once and synchronises all of them each
step, while BTM experts run independently.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # plan.py imports CostConfig from here
    from megatron_btm.pipeline.plan import RunPlan


def _positive(key: str, value, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"plan key {key!r} = {value!r}: must be a number {'>= 0' if allow_zero else '> 0'}")


@dataclass(kw_only=True)
class CostConfig:
    """How `btm plan cost` turns a stage's tokens into GPU-hours where the plan states none."""
    tokens_per_second_per_gpu: float | None = None   # training throughput of one GPU (rank), or ...
    peak_tflops: float | None = None   # ... per GPU: peak TFLOP/s (V100 fp16: 125) with ...
    mfu: float | None = None           # ... model FLOPs utilisation; 6 · params FLOPs per token
    job_overhead_s: float = 0.0        # per training job, outside the training loop

    def __post_init__(self):
        _positive("cost.tokens_per_second_per_gpu", self.tokens_per_second_per_gpu)
        _positive("cost.peak_tflops", self.peak_tflops)
        _positive("cost.mfu", self.mfu)
        _positive("cost.job_overhead_s", self.job_overhead_s, allow_zero=True)
        if self.mfu is not None and self.mfu > 1:
            raise ValueError(f"plan key 'cost.mfu' = {self.mfu!r}: must be <= 1")
        if self.tokens_per_second_per_gpu is not None and (self.peak_tflops or self.mfu):
            raise ValueError("plan key 'cost.tokens_per_second_per_gpu': give it or "
                             "peak_tflops + mfu, not both")
        if (self.peak_tflops is None) != (self.mfu is None):
            raise ValueError("plan key 'cost.peak_tflops' / 'cost.mfu': give both (or "
                             "tokens_per_second_per_gpu)")

    @property
    def given(self) -> bool:
        return self.tokens_per_second_per_gpu is not None or self.peak_tflops is not None


def tokens_per_second_per_gpu(plan: RunPlan, stage: str) -> float:
    """The cost section's throughput for a stage's model: stated, or peak × MFU / (6 · params),
    params counted by GPTConfig.num_parameters (every architecture, as the MoE rows)."""
    c = plan.cost
    if c.tokens_per_second_per_gpu is not None:
        return float(c.tokens_per_second_per_gpu)
    return c.peak_tflops * 1e12 * c.mfu / (6 * plan.train_config_for(stage).model.num_parameters())


def job_hours(plan: RunPlan, stage: str, ranks: int) -> tuple[int, float]:
    """(tokens, wall hours) of one training job of `stage` computing on `ranks` GPUs."""
    cfg = plan.train_config_for(stage)
    tokens = cfg.steps * cfg.tokens_per_step()
    seconds = tokens / (tokens_per_second_per_gpu(plan, stage) * ranks) + plan.cost.job_overhead_s
    return tokens, seconds / 3600


@dataclass(kw_only=True)
class StageCost:
    stage: str
    experts: int
    gpu_hours_per_expert: float | None
    gpu_hours: float | None
    gpus_at_once: int
    wall_hours: float | None
    source: str = "stated"             # stated | throughput | compute_fraction | none
    tokens_per_expert: int | None = None   # with source throughput


@dataclass(kw_only=True)
class MoeStageCost(StageCost):
    """merge-moe or one train-moe run (experts: the MoE's); see moe_costs for what is counted."""
    parameters: int = 0                # of the MoE, every expert
    active_parameters: int = 0         # one token's: shared + top-k experts' MLPs + the routers
    flops_per_token: float = 0.0       # train-moe: its training; merge-moe: the router's forward
    bytes_read: int = 0                # merge-moe's streaming pass (not priced: I/O)
    bytes_written: int = 0


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
    moe_stages: list[MoeStageCost] = field(default_factory=list)   # the plan's `moe:` section

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.moe_stages:   # a plan without the section: the figures it had before
            out.pop("moe_stages")
        return out


def plan_cost(plan: RunPlan) -> PlanCost:
    cl = plan.cluster
    out = PlanCost(plan=plan.name, reference_gpu_hours=plan.baseline.reference_gpu_hours)
    cycles = []
    for cycle in plan.cycles:
        n, g, src, tokens = len(cycle.domains), cycle.gpu_hours_per_expert, "stated", None
        if g is None and plan.cost.given:
            tokens, wall = job_hours(plan, f"cycle{cycle.index}", cl.expert_ntasks)
            g, src = wall * cl.gpus_per_expert, "throughput"
        waves = math.ceil(n / cl.max_concurrent)   # the `%` limit runs the array in waves
        gpus = min(n, cl.max_concurrent) * cl.gpus_per_expert
        cycles.append(StageCost(stage=f"cycle {cycle.index}", experts=n, gpu_hours_per_expert=g,
                                gpu_hours=None if g is None else n * g, gpus_at_once=gpus,
                                wall_hours=None if g is None else waves * g / cl.gpus_per_expert,
                                source=src if g is not None else "none", tokens_per_expert=tokens))
    seed_gpus = cl.seed_nodes * cl.gpus_per_expert
    seed = plan.seed
    seed_h = seed.gpu_hours if seed else 0.0   # an existing forest: its seed is already paid for
    src, tokens = "stated", None
    if seed_h is None and plan.cost.given:   # a checkpoint or a random init trains nothing
        tokens, wall = (job_hours(plan, "seed", cl.seed_nodes * cl.seed_tasks_per_node)
                        if seed.trained else (0, 0.0))
        seed_h, src = wall * seed_gpus, "throughput"
    if seed_h is None and seed.compute_fraction is not None and cycles[0].gpu_hours is not None:
        f = seed.compute_fraction
        seed_h, src = f / (1 - f) * cycles[0].gpu_hours, "compute_fraction"
    seed = StageCost(stage="seed", experts=1, gpu_hours_per_expert=seed_h, gpu_hours=seed_h,
                     gpus_at_once=seed_gpus, wall_hours=None if seed_h is None else seed_h / seed_gpus,
                     source="none" if seed_h is None else src, tokens_per_expert=tokens)
    out.stages = [seed, *cycles]
    out.moe_stages = moe_costs(plan) if plan.moe is not None else []
    rows = out.stages + out.moe_stages
    if all(s.gpu_hours is not None for s in rows):
        total = sum(s.gpu_hours for s in rows)
        out.total_gpu_hours = total
        out.wall_hours = sum(s.wall_hours for s in out.stages) + _moe_wall(out.moe_stages)
        out.seed_share = seed_h / total if total else None
        out.dense_matched_gpu_hours = total
        dense_gpus = plan.baseline.reference_gpus or max(s.gpus_at_once for s in rows)
        out.dense_matched_wall_hours = total / dense_gpus
        if out.reference_gpu_hours:
            out.fraction_of_reference = total / out.reference_gpu_hours
    return out


def _fmt(x: float | None, nd: int = 1) -> str:
    if x is not None and 0 < abs(x) < 1:   # small (pico) plans: 3 significant digits
        return f"{x:.3g}"
    return "?" if x is None else f"{x:,.{nd}f}"


def format_cost(cost: PlanCost) -> str:
    rows_ = cost.stages + cost.moe_stages
    w = max(10, *(len(s.stage) for s in rows_))   # 10: the forest's columns as they always were
    rows = [f"GPU-hour accounting for plan {cost.plan!r}",
            f"{'stage':<{w}} {'experts':>7} {'GPU-h/expert':>13} {'GPU-h':>10} {'GPUs at once':>13} "
            f"{'wall h':>8}  from"]
    for s in rows_:
        rows.append(f"{s.stage:<{w}} {s.experts:>7} {_fmt(s.gpu_hours_per_expert):>13} {_fmt(s.gpu_hours):>10} "
                    f"{s.gpus_at_once:>13} {_fmt(s.wall_hours):>8}  {s.source}")
    rows.append(f"{'total':<{w}} {sum(s.experts for s in cost.stages[1:]):>7} {'':>13} "
                f"{_fmt(cost.total_gpu_hours):>10} {'':>13} {_fmt(cost.wall_hours):>8}")
    rows += _format_moe(cost.moe_stages)
    if cost.total_gpu_hours is None:
        rows.append("(some stage has no budget: set seed.gpu_hours / compute_fraction and "
                    "cycles[*].gpu_hours_per_expert, or a cost section: tokens_per_second_per_gpu "
                    "or peak_tflops + mfu" + (", which the moe stages need" if cost.moe_stages else "")
                    + ")")
        return "\n".join(rows) + "\n"
    rows.append(f"seed share of total: {cost.seed_share:.1%}")
    rows.append(f"compute-matched dense baseline: {_fmt(cost.dense_matched_gpu_hours)} GPU-h "
                f"({_fmt(cost.dense_matched_wall_hours)} h wall-clock)")
    if cost.reference_gpu_hours:
        rows.append(f"reference dense model: {_fmt(cost.reference_gpu_hours)} GPU-h; the forest uses "
                    f"{cost.fraction_of_reference:.1%} of it")
    return "\n".join(rows) + "\n"


# ---- the moe: stages (pipeline/moe_nodes.py) ---------------------------------------------------
# FLOPs per token from the parameters a token goes through (GPTConfig.num_active_parameters: A =
# shared + per layer topk experts' MLPs + the router's n rows) at 2 FLOPs per parameter and pass:
#   full         6 · A              forward 2A, activation gradients 2A, weight gradients 2A
#   router-only  4 · A + 2 · R      weights frozen: no weight gradient but the routers' (R, every
#                                   layer's [n, h] + bias); the activation gradient still runs
#                                   through every layer down to the first router
# merge-moe: a streaming pass (I/O); with router: hidden also the forward of the uniform-router
# MoE (top-n, every expert: 2 · its parameters per token) over num_sequences blocks per domain.


def _flops_per_second_per_gpu(plan: RunPlan) -> float:
    """The cost section's compute rate: peak × MFU, or a stated throughput of the dense model
    times its 6 · params FLOPs per token (the rate the measured runs reached)."""
    c = plan.cost
    if c.peak_tflops is not None:
        return c.peak_tflops * 1e12 * c.mfu
    dense = plan.train_config_for(f"cycle{plan.cycles[-1].index}").model
    return c.tokens_per_second_per_gpu * 6 * dense.num_parameters()


def _moe_experts(plan: RunPlan) -> int:
    if plan.moe.experts:
        return len(plan.moe.experts)
    if plan.forest is None:
        return len(plan.all_domains())
    from megatron_btm.forest import Forest   # an existing forest: its experts and the plan's new ones
    return len(Forest.open(plan.forest).experts()) + len(plan.all_domains())


def _param_bytes(train_cfg) -> int:
    """Bytes per parameter of the checkpoints: fp32 4; bf16, fp16 and auto (bf16 on GPUs) 2."""
    return 4 if train_cfg.dtype == "fp32" else 2


def moe_costs(plan: RunPlan) -> list[MoeStageCost]:
    """merge-moe (1 GPU), then each train-moe run (a job like an expert's), at the cost
    section's compute rate; without a cost section they have no budget."""
    from megatron_btm.megatron.model import GPTConfig
    from megatron_btm.moe.layout import moe_model_config
    from megatron_btm.pipeline import graph as G
    from megatron_btm.pipeline.moe_nodes import train_config, train_id
    cl, m, given = plan.cluster, plan.moe, plan.cost.given
    rate = _flops_per_second_per_gpu(plan) if given else None
    dense_cfg = plan.train_config_for(f"cycle{plan.cycles[-1].index}")
    n, dense = _moe_experts(plan), dense_cfg.model
    moe = moe_model_config(dense.to_dict(), num_experts=n, topk=m.topk)
    params = GPTConfig.from_dict(moe).num_parameters()
    b = _param_bytes(dense_cfg)
    hidden = m.router == "hidden"   # writes the uniform-router MoE, reads it back, writes the result
    read, written = (n * dense.num_parameters() + hidden * params) * b, (1 + hidden) * params * b
    fwd_tokens = n * m.num_sequences * dense.seq_length if hidden else 0
    merge_s = None if rate is None else fwd_tokens * 2 * params / rate + plan.cost.job_overhead_s
    rows = [_moe_row(G.MERGE_MOE, n, merge_s, 1, "io" if given else "none", tokens=fwd_tokens,
                     parameters=params, active_parameters=params, flops_per_token=2.0 * params,
                     bytes_read=read, bytes_written=written)]
    for run in m.train:
        cfg = train_config(plan, run, moe)
        a, r = cfg.model.num_active_parameters(), cfg.model.router_parameters()
        flops = 6.0 * a if run.mode == "full" else 4.0 * a + 2.0 * r
        tokens = cfg.steps * cfg.tokens_per_step()
        s = None if rate is None else tokens * flops / (rate * cl.expert_ntasks) + plan.cost.job_overhead_s
        rows.append(_moe_row(train_id(run.name), n, s, cl.gpus_per_expert,
                             "throughput" if given else "none", tokens=tokens,
                             parameters=cfg.model.num_parameters(), active_parameters=a,
                             flops_per_token=flops))
    return rows


def _moe_row(stage: str, experts: int, seconds: float | None, gpus: int, source: str, *,
             tokens: int, **figures) -> MoeStageCost:
    """One job holding `gpus` GPUs for `seconds` (None: no budget)."""
    wall = None if seconds is None else seconds / 3600
    g = None if wall is None else wall * gpus
    return MoeStageCost(stage=stage, experts=experts, gpu_hours_per_expert=g, gpu_hours=g,
                        gpus_at_once=gpus, wall_hours=wall, source=source, tokens_per_expert=tokens,
                        **figures)


def _moe_wall(rows: list[MoeStageCost]) -> float:
    """merge-moe, then every train-moe run at once (each is its own job after the merge)."""
    if not rows:
        return 0.0
    return rows[0].wall_hours + max((r.wall_hours for r in rows[1:]), default=0.0)


def _format_moe(rows: list[MoeStageCost]) -> list[str]:
    if not rows:
        return []
    merge = rows[0]
    out = [f"moe: {merge.experts} experts, {merge.parameters:,} parameters; merge-moe streams "
           f"{merge.bytes_read / 1e9:.3g} GB in and {merge.bytes_written / 1e9:.3g} GB out (I/O, not "
           f"priced: its GPU-h are the router's forward over {merge.tokens_per_expert:,} tokens "
           f"and the job overhead)"]
    for r in rows[1:]:
        out.append(f"{r.stage}: {r.tokens_per_expert:,} tokens x {r.flops_per_token:,.0f} FLOPs "
                   f"({r.active_parameters:,} active parameters per token)")
    return out


# ---- communication model: why independent experts take more updates per second ----------------
# Dense data parallelism all-reduces every gradient each step; a ring all-reduce over n ranks
# sends 2(n-1)/n × gradient bytes per rank in 2(n-1) latency-bound hops. Experts never sync.
# Without overlap of the all-reduce with the backward pass (what Megatron DDP does on CPU):
#   t_dense = t_compute + 2(n-1)·lat + 2(n-1)/n · grad_bytes / bw,   ratio = t_dense / t_compute.

INTERCONNECTS = {  # per-rank link: (bytes/s, one-hop latency s); nominal, not measured
    "100gbe": (100e9 / 8, 10e-6),
    "ib-hdr": (200e9 / 8, 2e-6),
    "nvlink": (300e9, 1e-6),        # NVLink 3 (A100): ~300 GB/s per direction per GPU
    "10gbe": (10e9 / 8, 50e-6),
}


@dataclass(kw_only=True)
class Interconnect:
    name: str
    bandwidth_bytes_s: float
    latency_s: float

    def __post_init__(self):
        if not (self.bandwidth_bytes_s > 0 and math.isfinite(self.bandwidth_bytes_s)):
            raise ValueError(f"interconnect {self.name!r}: bandwidth must be a positive number")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"interconnect {self.name!r}: latency must be a number >= 0")


def parse_interconnect(spec: str) -> Interconnect:
    """`100gbe` | `ib-hdr` | `nvlink` | `10gbe` | `custom:BW,LAT` (BW in Gbit/s, LAT in µs)."""
    if spec in INTERCONNECTS:
        bw, lat = INTERCONNECTS[spec]
        return Interconnect(name=spec, bandwidth_bytes_s=bw, latency_s=lat)
    if spec.startswith("custom:"):
        parts = spec[len("custom:"):].split(",")
        try:
            bw_gbit, lat_us = (float(x) for x in parts)
        except ValueError:
            raise ValueError(f"--interconnect {spec!r}: custom needs two numbers, "
                             "custom:BW_GBIT_S,LATENCY_US (e.g. custom:25,5)") from None
        return Interconnect(name=spec, bandwidth_bytes_s=bw_gbit * 1e9 / 8, latency_s=lat_us * 1e-6)
    raise ValueError(f"--interconnect {spec!r}: use one of {sorted(INTERCONNECTS)} "
                     "or custom:BW_GBIT_S,LATENCY_US")


def allreduce_bytes(grad_bytes: float, n: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of grad_bytes over n ranks."""
    if n < 1:
        raise ValueError(f"ranks {n}: must be >= 1")
    return 2 * (n - 1) / n * grad_bytes


def allreduce_seconds(grad_bytes: float, n: int, link: Interconnect) -> float:
    return allreduce_bytes(grad_bytes, n) / link.bandwidth_bytes_s + 2 * (n - 1) * link.latency_s


def updates_ratio(*, compute_s: float, grad_bytes: float, n: int, link: Interconnect) -> float:
    """Predicted updates/s of an independent expert ÷ updates/s of one dense DP run on n ranks."""
    if compute_s <= 0:
        raise ValueError(f"compute time {compute_s}: must be > 0")
    return (compute_s + allreduce_seconds(grad_bytes, n, link)) / compute_s


# The paper's dense settings (Li et al. 2022, as this project reads them): model size, GPUs of
# the dense DP run. Per GPU and step: MICRO tokens; compute = 6·params·tokens / (peak·MFU).
PAPER_SETTINGS = [("125M", 125e6, 16), ("350M", 350e6, 32), ("750M", 750e6, 64), ("1.3B", 1.3e9, 128)]


@dataclass(kw_only=True)
class CommAssumptions:
    tokens_per_gpu_step: int = 8 * 1024     # micro-batch 8 × sequence 1024
    peak_flops: float = 125e12             # V100 fp16 tensor-core peak
    mfu: float = 0.3                       # model FLOPs utilisation
    grad_bytes_per_param: int = 4          # Megatron DDP reduces in fp32 (grad_reduce_in_fp32)

    def __post_init__(self):
        for k in ("tokens_per_gpu_step", "peak_flops", "mfu", "grad_bytes_per_param"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} {getattr(self, k)}: must be > 0")
        if self.mfu > 1:
            raise ValueError(f"mfu {self.mfu}: must be <= 1")


def paper_predictions(link: Interconnect, a: CommAssumptions | None = None) -> list[dict]:
    a = a or CommAssumptions()
    rows = []
    for name, params, gpus in PAPER_SETTINGS:
        compute = 6 * params * a.tokens_per_gpu_step / (a.peak_flops * a.mfu)
        grad = params * a.grad_bytes_per_param
        comm = allreduce_seconds(grad, gpus, link)
        rows.append({"model": name, "params": params, "gpus": gpus, "compute_s": compute,
                     "allreduce_bytes": allreduce_bytes(grad, gpus), "allreduce_s": comm,
                     "ratio_experts_over_dense": updates_ratio(compute_s=compute, grad_bytes=grad,
                                                               n=gpus, link=link)})
    return rows


def format_comm(link: Interconnect, rows: list[dict], a: CommAssumptions | None = None) -> str:
    a = a or CommAssumptions()
    out = [f"communication model over {link.name}: {link.bandwidth_bytes_s * 8 / 1e9:g} Gbit/s, "
           f"{link.latency_s * 1e6:g} µs per hop; ring all-reduce, no overlap with backward",
           f"(per GPU step: {a.tokens_per_gpu_step} tokens, {a.peak_flops / 1e12:g} TFLOP/s × MFU "
           f"{a.mfu:g}, {a.grad_bytes_per_param}-byte gradients)",
           f"{'model':<6} {'GPUs':>5} {'compute s':>10} {'all-reduce MB':>14} {'comm s':>8} "
           f"{'experts/dense updates/s':>24}"]
    for r in rows:
        out.append(f"{r['model']:<6} {r['gpus']:>5} {r['compute_s']:>10.3f} "
                   f"{r['allreduce_bytes'] / 1e6:>14,.0f} {r['allreduce_s']:>8.3f} "
                   f"{r['ratio_experts_over_dense']:>24.2f}")
    return "\n".join(out) + "\n"
