"""`btm launch local`: the plan's stages on one machine, without SLURM.

The same stage commands as the sbatch scripts (commands.py), run as subprocesses (no shell):
a multi-rank stage goes through torchrun (`python -m torch.distributed.run --standalone`),
experts of a cycle run `parallel` at a time. The done-markers are the sbatch scripts' own, so
a local run that stopped continues where it left off, and each command's `--resume auto`
continues a half-trained run.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_btm.launch import commands as C
from megatron_btm.launch.plan import BTMPlan, check_training


def _program(plan: BTMPlan, ntasks: int) -> list[str]:
    words = shlex.split(plan.cluster.btm_command)
    if ntasks > 1:   # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; the CLI reads them
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ntasks}", "-m", "megatron_btm.cli"]
    if words == ["btm"] and shutil.which("btm") is None:
        return [sys.executable, "-m", "megatron_btm.cli"]
    return words


class LocalRun:
    def __init__(self, plan: BTMPlan, *, dry_run: bool = False):
        self.plan, self.dry_run = plan, dry_run
        self.values = C.plan_values(plan)
        self.done = Path(plan.run_dir) / "launch" / "done"
        self.logs = Path(plan.run_dir) / "logs"

    def step(self, marker: str, argv, ntasks: int = 1, domain: str | None = None) -> None:
        """Run one stage command unless its done-marker exists; raise on failure (naming the log)."""
        values = {**self.values, "DOMAIN": domain or ""}
        cmd = _program(self.plan, ntasks) + C.render_argv(argv, values)
        if self.dry_run:
            print(shlex.join(cmd))
            return
        if (self.done / marker).exists():
            print(f"[local] {marker}: done already, skipped")
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        self.done.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"local-{marker}.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        print(f"[local] {marker}: {shlex.join(cmd)}", flush=True)
        with open(log, "ab") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            raise RuntimeError(f"stage {marker} failed with exit code {rc}; log: {log}")
        (self.done / marker).touch()


def run_local(plan: BTMPlan, *, parallel: int = 1, dry_run: bool = False) -> int:
    if not dry_run:
        check_training(plan)
    r = LocalRun(plan, dry_run=dry_run)
    cl = plan.cluster
    r.step("seed-train", C.train_seed(plan), ntasks=cl.seed_tasks_per_node)
    r.step("seed", C.merge_seed())
    for cycle in plan.cycles:
        c = cycle.index
        r.step(f"cycle{c}-branch", C.branch(plan, cycle))
        with ThreadPoolExecutor(max_workers=1 if dry_run else parallel) as pool:
            futures = [pool.submit(r.step, f"cycle{c}-expert-{d}", C.train_expert(plan, cycle, d),
                                   cl.expert_ntasks, d) for d in cycle.domains]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:   # never merge a partial cycle
            raise RuntimeError(f"cycle {c}: {len(errors)} expert(s) failed: " + "; ".join(map(str, errors)))
        r.step(f"cycle{c}-merge", C.merge_cycle(cycle))
    if plan.evaluation.domains:
        if not dry_run:
            (Path(plan.run_dir) / "eval").mkdir(parents=True, exist_ok=True)
        r.step("eval", C.evaluate(plan))
    return 0
