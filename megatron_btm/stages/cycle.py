"""One BTM cycle on this machine: branch → train each domain's expert → merge.

Experts train in separate processes (`btm train-expert`), one after another or `parallel` at a
time, with no synchronisation between them — the same commands a SLURM job array runs. Each
process gets an equal share of the CPU threads. A failed expert does not stop the others; the
merge registers the experts that finished and the error names those that did not.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_btm.stages.branch import BranchConfig, branch


def expert_command(*, config: str | None, overrides: list[str], data_dir, domain: str,
                   init_from, output_dir) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_btm.cli", "train-expert", "--data", str(data_dir),
           "--domain", domain, "--init-from", str(init_from), "--output", str(output_dir),
           "--resume", "auto"]
    if config:
        cmd += ["--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_cycle(forest_root: str | Path, *, domains: list[str], data_dir: str | Path,
              work_dir: str | Path, config: str | None = None, overrides: list[str] | None = None,
              branch_cfg: BranchConfig | None = None, parallel: int = 1, cycle: int | None = None,
              log=print) -> list[str]:
    """Run one cycle; returns the merged expert ids. Raises if any expert failed (after merging
    the others)."""
    from megatron_btm.stages.merge import merge_expert
    if parallel < 1:
        raise ValueError(f"parallel={parallel}: must be >= 1")
    work_dir = Path(work_dir)
    records = branch(forest_root, domains=domains, data_dir=data_dir,
                     output_dir=work_dir / "branch", cfg=branch_cfg, cycle=cycle)
    cycle = next(iter(records.values()))["cycle"]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("RANK", None)  # each expert is its own world
    pending = list(domains)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: dict[str, int] = {}
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel:
            d = pending.pop(0)
            cmd = expert_command(config=config, overrides=(overrides or []) + [f"num_threads={threads}"],
                                 data_dir=data_dir, domain=d, init_from=work_dir / "branch" / d,
                                 output_dir=work_dir / "experts" / d)
            log_file = open(work_dir / "logs" / f"{d}.log", "w")
            running[d] = (subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT),
                          time.time())
            log(f"cycle {cycle}: training expert {d}")
        for d, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                del running[d]
                if proc.returncode:
                    failed[d] = proc.returncode
                    log(f"cycle {cycle}: expert {d} FAILED (exit {proc.returncode}); see "
                        f"{work_dir / 'logs' / (d + '.log')}")
                else:
                    log(f"cycle {cycle}: expert {d} trained in {time.time() - started:.0f} s")
        time.sleep(0.2)
    merged = []
    for d in domains:
        if d not in failed:
            merged.append(merge_expert(forest_root, work_dir / "experts" / d, domain=d, cycle=cycle).id)
    if failed:
        raise RuntimeError(f"cycle {cycle}: experts {sorted(failed)} failed (logs in "
                           f"{work_dir / 'logs'}); merged {merged}. Rerun the cycle to retry "
                           f"them: finished experts are not retrained")
    return merged
