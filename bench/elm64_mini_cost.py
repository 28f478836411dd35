"""elm64-mini: `btm plan cost` of examples/elm64-mini.yaml next to what each stage measured.

Measured per job from two sources:
  jobcomp  SLURM's job completion log (start/end of the job; cycles 1-2 only: the log was reset
           when the local cluster restarted), in results.json `stages`;
  logs     every job's output file RUN/logs/<job>-<id>.out: created when the job starts (birth
           time), last written near its end (mtime); a lower bound of the job's wall (it misses
           the process teardown after the last line), for every stage.
Allocated CPU-hours = job wall x (nodes x tasks per node x CPUs per task), GPU-hours = job wall x
the fake GPUs it holds, both read from the job's sbatch script. The plan's prediction covers the
training jobs (seed, expert arrays); branch and merge jobs are not in the cost model.

  python bench/elm64_mini_cost.py --run-dir /work/runs/elm64
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "examples" / "elm64-mini.yaml"


def job_resources(scripts: Path) -> dict[str, dict]:
    """job name -> {procs, gpus} from the #SBATCH lines of the run's scripts."""
    out = {}
    for f in sorted(scripts.glob("*.sbatch")):
        opts = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", f.read_text(), re.M))
        nodes = int(opts.get("nodes", 1))
        out[opts["job-name"]] = {"procs": nodes * int(opts.get("ntasks-per-node", 1)) * int(opts.get("cpus-per-task", 1)),
                                 "gpus": nodes * int(opts.get("gpus-per-node", 0))}
    return out


def log_jobs(logs: Path) -> list[dict]:
    """(name, start, end) of every job from its output file's birth and modification times."""
    files = sorted(str(p) for p in logs.glob("*.out"))
    if not files:
        return []
    st = subprocess.run(["stat", "-c", "%W %.9Y %n", *files], capture_output=True, text=True, check=True)
    jobs = []
    for line in st.stdout.splitlines():
        birth, mtime, name = line.split(" ", 2)
        m = re.match(r"(.+)-(\d+(?:_\d+)?)\.out$", Path(name).name)
        if m and float(birth) > 0:
            jobs.append({"name": m.group(1), "job": m.group(2), "start": float(birth), "end": float(mtime)})
    return jobs


def per_stage(jobs: list[dict], res: dict[str, dict]) -> dict:
    out: dict = {}
    for j in jobs:
        r = res.get(j["name"], {"procs": 1, "gpus": 0})
        s = out.setdefault(j["name"], {"jobs": 0, "start": j["start"], "end": j["end"], "job_walls_s": [],
                                       "cpu_h": 0.0, "gpu_h": 0.0})
        wall = j["end"] - j["start"]
        s["jobs"] += 1
        s["start"], s["end"] = min(s["start"], j["start"]), max(s["end"], j["end"])
        s["job_walls_s"].append(round(wall, 1))
        s["cpu_h"] += wall * r["procs"] / 3600
        s["gpu_h"] += wall * r["gpus"] / 3600
    for s in out.values():
        s["wall_s"] = round(s["end"] - s["start"], 1)
        s["mean_job_wall_s"] = round(sum(s["job_walls_s"]) / len(s["job_walls_s"]), 1)
    return out


def predicted(plan_path: Path = PLAN) -> dict:
    """`btm plan cost` per training stage, with the CPUs and GPUs each job holds."""
    sys.path.insert(0, str(REPO))
    from megatron_btm.pipeline.cost import plan_cost
    from megatron_btm.pipeline.plan import load_plan
    plan = load_plan(plan_path)
    cl, cost = plan.cluster, plan_cost(plan)
    out = {}
    for s in cost.stages:
        seed = s.stage == "seed"
        procs = (cl.seed_nodes * cl.seed_tasks_per_node if seed else cl.expert_ntasks) * cl.cpus_per_task
        gpus = (cl.seed_nodes if seed else 1) * cl.gpus_per_expert
        job_s = s.gpu_hours_per_expert * 3600 / gpus
        name = "btm-elm64-seed" if seed else f"btm-elm64-c{s.stage.split()[1]}-train"
        out[name] = {"jobs": s.experts, "tokens_per_job": s.tokens_per_expert, "job_wall_s": round(job_s, 1),
                     "wall_s": round(s.wall_hours * 3600, 1), "gpu_h": s.gpu_hours,
                     "cpu_h": job_s * procs * s.experts / 3600, "source": s.source}
    return {"plan": str(plan_path.relative_to(REPO)), "cost_section": vars(plan.cost), "stages": out,
            "total_gpu_h": cost.total_gpu_hours}


def compare(run_dir: Path, jobcomp: dict) -> dict:
    run = run_dir / "run"
    logs = per_stage(log_jobs(run / "logs"), job_resources(run / "slurm" / "scripts"))
    return {"note": "measured: jobcomp (SLURM, cycles 1-2 and the seed) and logs (output files' birth "
                    "to last write, every stage; a lower bound); predicted: btm plan cost of "
                    "examples/elm64-mini.yaml (cost section calibrated on cycle 1's jobs)",
            "predicted": predicted(), "measured_logs": logs,
            "measured_jobcomp": {k: v for k, v in jobcomp.items()}}


def table(cmp: dict) -> str:
    pred, logs, jc = cmp["predicted"]["stages"], cmp["measured_logs"], cmp["measured_jobcomp"]
    rows = ["| stage | jobs | predicted job wall s | measured job wall s, mean (logs) | predicted stage wall s | "
            "measured stage wall s (jobcomp / logs) | predicted CPU-h | measured CPU-h (jobcomp / logs) | "
            "predicted GPU-h | measured GPU-h (logs) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = sorted(logs, key=lambda n: (logs[n]["start"]))
    for n in names:
        p, m, j = pred.get(n), logs[n], jc.get(n)
        jw = f"{j['wall_s']:.0f}" if j else "-"
        jc_h = f"{j['cpu_h']:.3f}" if j else "-"
        rows.append(f"| {n.removeprefix('btm-elm64-')} | {m['jobs']} | {p['job_wall_s']:.0f} | " if p else
                    f"| {n.removeprefix('btm-elm64-')} | {m['jobs']} | - | ")
        rows[-1] += (f"{m['mean_job_wall_s']:.0f} | {p['wall_s']:.0f} | " if p else f"{m['mean_job_wall_s']:.0f} | - | ")
        rows[-1] += f"{jw} / {m['wall_s']:.0f} | "
        rows[-1] += (f"{p['cpu_h']:.3f} | " if p else "- | ") + f"{jc_h} / {m['cpu_h']:.3f} | "
        rows[-1] += (f"{p['gpu_h']:.3f} | " if p else "- | ") + f"{m['gpu_h']:.3f} |"
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "elm64-mini" / "results.json")
    a = ap.parse_args(argv)
    res = json.loads(a.results.read_text()) if a.results.exists() else {}
    cmp = compare(a.run_dir.resolve(), res.get("stages") or {})
    print(table(cmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
