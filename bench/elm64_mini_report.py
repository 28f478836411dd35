"""bench/results/elm64-mini/{results.json,report.md} from what the elm64-mini run has written so
far: the driver's data-stage timings, the clustering report (purity), the SLURM jobs' start/end
(jobcomp), the run's node states and, once there, the eval tables (bench/elm64_mini_eval.py);
`btm plan cost` next to the measured stages (bench/elm64_mini_cost.py) and, from --extra-dir,
the temperature sweep (tsweep.json) and the clustered-vs-provenance comparison (compare.json).
Keys already in results.json are kept where this run of the script finds nothing for them (the
jobcomp log of the run's early stages is gone once the local cluster restarts).

  python bench/elm64_mini_report.py --run-dir /work/runs/elm64 --extra-dir /work/runs/elm64-extra
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elm64_mini import REPO  # noqa: E402
from elm64_mini_cost import compare  # noqa: E402

OUT = REPO / "bench" / "results" / "elm64-mini"
JOBCOMP = Path("/tmp/btm-slurm/log/jobcomp.txt")


def _read(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def slurm_jobs(name: str) -> list[dict]:
    """Finished jobs of this plan from the local cluster's jobcomp log."""
    out = []
    if not JOBCOMP.exists():
        return out
    for line in JOBCOMP.read_text().splitlines():
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        if not f.get("Name", "").startswith(f"btm-{name}-"):
            continue
        t0, t1 = (dt.datetime.fromisoformat(f[k]) for k in ("StartTime", "EndTime"))
        out.append({"job": f["JobId"], "name": f["Name"], "state": f["JobState"], "wall_s": (t1 - t0).total_seconds(),
                    "procs": int(f["ProcCnt"]), "start": f["StartTime"], "end": f["EndTime"]})
    return out


def per_stage(jobs: list[dict]) -> dict:
    stages: dict = {}
    for j in jobs:
        s = stages.setdefault(j["name"], {"jobs": 0, "first_start": j["start"], "last_end": j["end"], "cpu_h": 0.0})
        s["jobs"] += 1
        s["first_start"], s["last_end"] = min(s["first_start"], j["start"]), max(s["last_end"], j["end"])
        s["cpu_h"] += j["wall_s"] * j["procs"] / 3600   # allocated CPU-hours (ProcCnt x wall)
    for s in stages.values():
        s["wall_s"] = (dt.datetime.fromisoformat(s["last_end"]) - dt.datetime.fromisoformat(s["first_start"])).total_seconds()
    return stages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--name", default="elm64")
    ap.add_argument("--extra-dir", type=Path, default=None, help="tsweep.json / compare.json from the extra runs")
    a = ap.parse_args(argv)
    work = a.run_dir.resolve()
    rep = _read(work / "corpus" / "report.json") or {}
    done = sorted(p.stem for p in (work / "run" / "graph" / "done").glob("*.json"))
    failed = sorted(p.stem for p in (work / "run" / "graph" / "failed").glob("*.json"))
    res = {"driver": _read(work / "driver.json"), "eval_timings": _read(work / "eval-timings.json"),
           "clusters": {"k": len(rep.get("clusters", [])), "purity": rep.get("purity"),
                        "purity_bytes": rep.get("purity_bytes"), "empty_splits": rep.get("empty_splits"),
                        "train_docs": sorted(v["train"] for v in rep.get("splits", {}).values()
                                             if isinstance(v, dict) and "train" in v)},
           "nodes_done": done, "nodes_failed": failed, "stages": per_stage(slurm_jobs(a.name)),
           "eval": _read(work / "eval-main.json") or _read(work / "run" / "eval" / "test.json")}
    old = _read(OUT / "results.json") or {}
    res = {**old, **{k: v for k, v in res.items() if v not in (None, {}, []) or k not in old}}
    res["cost_vs_measured"] = compare(work, res.get("stages") or {})
    for key in ("tsweep", "compare"):
        extra = _read(a.extra_dir / f"{key}.json") if a.extra_dir else None
        if extra is not None:
            res[key] = extra
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("eval",)}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
