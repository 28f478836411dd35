"""The stage commands a plan runs, as argv lists, and the run folder's layout.

One description serves both launchers: an argv item is a tuple of parts, each a literal string
or a `Var` (a value only known where the command runs: the array task's domain, the run dir as
a script variable). `render_bash` quotes literals with shlex and writes variables as "${NAME}",
so no plan value can become shell syntax; `render_argv` substitutes real values for the local
launcher (no shell at all).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from megatron_btm.launch.plan import BTMPlan, CycleConfig


@dataclass(frozen=True)
class Var:
    name: str


Part = Union[str, Var]
Arg = tuple[Part, ...]

RUN = Var("RUN_DIR")
DATA = Var("DATA_DIR")
CONFIG = Var("TRAIN_CONFIG")
DOMAIN = Var("DOMAIN")


def arg(*parts: Part) -> Arg:
    return tuple(parts)


def lit(*items: str) -> list[Arg]:
    return [(s,) for s in items]


# Run folder layout, relative to run_dir (parts, so both launchers can use them).
def forest(run: Part = RUN) -> Arg:
    return (run, "/forest")


def seed_run(run: Part = RUN) -> Arg:
    return (run, "/seed")


def branch_dir(c: int, run: Part = RUN) -> Arg:
    return (run, f"/cycle{c}/branch")


def expert_run(c: int, domain: Part, run: Part = RUN) -> Arg:
    return (run, f"/cycle{c}/experts/", domain)


def override_strings(*maps: Mapping) -> list[str]:
    """`key=value` for --set, later maps winning (plan-wide < stage < steps)."""
    merged: dict = {}
    for m in maps:
        merged.update(m)
    return [f"{k}={'true' if v is True else 'false' if v is False else v}" for k, v in merged.items()]


def _overrides(*maps: Mapping) -> list[Arg]:
    out: list[Arg] = []
    for s in override_strings(*maps):
        out += lit("--set", s)
    return out


def train_seed(plan: BTMPlan) -> list[Arg]:
    steps = {"steps": plan.seed.steps} if plan.seed.steps else {}
    return (lit("train-seed", "--config") + [(CONFIG,), *lit("--data"), (DATA,)]
            + lit("--domains", ",".join(plan.seed.domains), "--output") + [seed_run()]
            + lit("--resume", "auto") + _overrides(plan.overrides, plan.seed.overrides, steps))


def merge_seed() -> list[Arg]:
    return lit("merge", "--forest") + [forest()] + lit("--seed", "--run") + [seed_run()]


def branch(plan: BTMPlan, cycle: CycleConfig) -> list[Arg]:
    return (lit("branch", "--forest") + [forest(), *lit("--data"), (DATA,)]
            + lit("--domains", ",".join(cycle.domains), "--output") + [branch_dir(cycle.index)]
            + lit("--policy", plan.branch.policy, "--k", str(plan.branch.k),
                  "--split", plan.branch.split, "--num-sequences", str(plan.branch.num_sequences),
                  "--cycle", str(cycle.index)))


def train_expert(plan: BTMPlan, cycle: CycleConfig, domain: Part = DOMAIN) -> list[Arg]:
    steps = {"steps": cycle.steps} if cycle.steps else {}
    return (lit("train-expert", "--config") + [(CONFIG,), *lit("--data"), (DATA,), *lit("--domain"), (domain,)]
            + lit("--init-from") + [branch_dir(cycle.index) + ("/", domain)]
            + lit("--output") + [expert_run(cycle.index, domain)]
            + lit("--resume", "auto") + _overrides(plan.overrides, cycle.overrides, steps))


def merge_cycle(cycle: CycleConfig) -> list[Arg]:
    """One merge for the whole cycle (one process, one import of torch): each run is registered
    under its own domain (its stage.json), parents from its branch record; idempotent."""
    runs: list[Arg] = []
    for d in cycle.domains:
        runs += [("--run",), expert_run(cycle.index, d)]
    return lit("merge", "--forest") + [forest()] + lit("--cycle", str(cycle.index)) + runs


def evaluate(plan: BTMPlan) -> list[Arg]:
    ev = plan.evaluation
    argv = (lit("eval", "--forest") + [forest(), *lit("--data"), (DATA,)]
            + lit("--domains", ",".join(ev.domains), "--split", ev.split,
                  "--modes", ",".join(ev.modes), "--topk", ",".join(map(str, ev.topk))))
    if ev.max_blocks:
        argv += lit("--max-blocks", str(ev.max_blocks))
    return argv + lit("--output") + [(RUN, f"/eval/{ev.split}.json")]


def render_bash(argv: Sequence[Arg]) -> str:
    """One shell word per argv item: literals single-quoted when needed, variables as "${X}"."""
    words = []
    for item in argv:
        word = "".join(f'"${{{p.name}}}"' if isinstance(p, Var) else (shlex.quote(p) if p else "")
                       for p in item)
        words.append(word or "''")
    return " ".join(words)


def render_argv(argv: Sequence[Arg], values: Mapping[str, str]) -> list[str]:
    """Real strings for subprocess (no shell): every Var replaced by `values[name]`."""
    return ["".join(values[p.name] if isinstance(p, Var) else p for p in item) for item in argv]


def plan_values(plan: BTMPlan) -> dict[str, str]:
    return {"RUN_DIR": plan.run_dir, "DATA_DIR": plan.data_dir, "TRAIN_CONFIG": plan.train_config}
