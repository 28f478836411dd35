"""The real thing on the project's local SLURM cluster (CPU, pico model, ../shared/corpora):
seed + 2 cycles x 4 domains through `btm run --executor slurm` (job arrays, afterok), with one
expert of cycle 1 failing on purpose: its cycle is not merged and cycle 2 does not start;
`btm status` names it; `btm resume` finishes the run, and the forest equals (bitwise) the
same plan run in-process without a fault. And a running expert requeued with
`scontrol requeue` resumes from its checkpoint and ends with the same loss as an
uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_helpers import job_state, wait_idle
from pipeline_helpers import assert_same_forest, forest_summary

from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import slurm, slurm_executor
from megatron_btm.pipeline.nodes import FAIL_ENV, freeze
from megatron_btm.pipeline.plan import load_plan
from megatron_btm.pipeline.sbatch import build_jobs, write_scripts
from megatron_btm.utils.io import read_json

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CYCLES = (("bible", "biology", "changelogs", "code_c"), ("code_perl", "code_python", "debian_docs", "dictionary"))
FAIL = "cycle1-train-biology"


def _btm(*args, timeout=600, env=None, check=True):
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *args], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _plan_file(tmp: Path, data: Path, name: str, **changes) -> Path:
    """examples/btm-slurm-mini.yaml with this test's folders; jobs run this checkout's CLI."""
    raw = yaml.safe_load((REPO / "examples" / "btm-slurm-mini.yaml").read_text())
    raw.update(name=name, run_dir=str(tmp / name), data_dir=str(data), **changes)
    raw["cluster"]["btm_command"] = f"{sys.executable} -m megatron_btm.cli"
    raw["cluster"]["env_setup"] = raw["cluster"]["env_setup"] + [f"export PYTHONPATH={REPO}"]
    f = tmp / f"{name}.yaml"
    f.write_text(yaml.safe_dump(raw, sort_keys=False))
    return f


def _ids(plan) -> list[str]:
    return [s["job_id"] for subs in read_json(slurm_executor.state_path(plan))["jobs"].values() for s in subs]


@pytest.fixture(scope="module")
def e2e(slurm_cluster, corpora, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = tmp / "corpus"   # a small slice of each domain
    for d in {"glossary", *(d for c in CYCLES for d in c)}:   # glossary: evaluation only
        for split, n in (("train", 40), ("valid", 12), ("test", 4)):
            lines = (corpora / d / f"{split}.jsonl").read_text().splitlines()[:n]
            (corpus / d).mkdir(parents=True, exist_ok=True)
            (corpus / d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    _btm("preprocess", "--corpus", str(corpus), "--output", str(tmp / "data"), "--vocab-size", "512",
         "--tokenizer-train-bytes", "400000", "--workers", "1", "--no-progress")
    plan_yaml = _plan_file(tmp, tmp / "data", "mini")
    plan = load_plan(plan_yaml)
    failed = _btm("run", str(plan_yaml), "--executor", "slurm", timeout=120, env={FAIL_ENV: FAIL})
    wait_idle(_ids(plan), timeout=1500)
    states = {s.node: s.state for s in slurm_executor.node_states(plan, G.build_graph(plan))}
    status = _btm("status", str(plan_yaml)).stdout
    resumed = _btm("resume", str(plan_yaml), "--executor", "slurm", timeout=120)
    wait_idle(_ids(plan), timeout=1500)
    # the reference: the same plan in-process, no fault
    ref_yaml = _plan_file(tmp, tmp / "data", "reference")
    _btm("run", str(ref_yaml), "--executor", "inprocess", timeout=1500)
    return tmp, plan, plan_yaml, failed.stdout, states, status, resumed.stdout


def test_failed_expert_blocks_the_merge_and_resume_equals_an_uninterrupted_run(e2e):
    tmp, plan, plan_yaml, submitted, states, status, resumed = e2e
    assert "submitted: seed, cycle1-branch" in submitted and "cycle2-merge, eval" in submitted
    # after the fault: the failed expert, its siblings done, the merge and cycle 2 never ran
    assert states[FAIL] == "failed"
    assert all(states[f"cycle1-train-{d}"] == "done" for d in CYCLES[0] if d != "biology")
    assert states["cycle1-merge"] == "cancelled" and states["cycle2-branch-code_perl"] == "cancelled"
    assert f"failed nodes: {FAIL} (node {FAIL}: failed on purpose" in status
    assert resumed.startswith(f"submitted: cycle1-train:{FAIL}, cycle1-merge, cycle2-branch")
    final = _btm("status", str(plan_yaml)).stdout
    assert final.rstrip().endswith("run complete"), final + "\n" + "\n".join(
        p.read_text()[-1500:] for p in (Path(plan.run_dir) / "logs").glob("*.out"))
    got, want = forest_summary(Path(plan.run_dir)), forest_summary(tmp / "reference")
    assert_same_forest(got, want)
    for c, domains in enumerate(CYCLES, start=1):
        for d in domains:
            e = got[d]
            assert e["cycle"] == c
            branch = read_json(Path(plan.run_dir) / G.branch_dir(c, d) / "branch.json")
            assert [p for p, _ in e["parents"]] == [p["id"] for p in branch["parents"]]
            if c == 1:   # the first cycle branches from the seed
                assert [p for p, _ in e["parents"]] == ["seed"]
            else:        # later: top-2 of the forest as it was at the start of the cycle
                assert len(e["parents"]) == 2 and {p for p, _ in e["parents"]} <= {"seed", *CYCLES[0]}
                assert branch["forest_snapshot"] == sorted(CYCLES[0])
    results = (Path(plan.run_dir) / "eval" / "test.json").read_text()   # the eval job's table
    assert "glossary" in results and "bible" in results


def test_requeued_expert_resumes_from_checkpoint_with_the_same_final_loss(e2e):
    tmp, base, _, _, _, _, _ = e2e
    over = {"save_interval": 20, "keep_checkpoints": 100}
    cycles = [{"domains": ["biology"], "steps": 300, "overrides": over}]
    plans = {n: load_plan(_plan_file(tmp, Path(base.data_dir), n, cycles=cycles)) for n in ("requeue", "ref300")}
    for p in plans.values():   # both start from the e2e run's branch of biology, inputs done
        freeze(p)
        g = G.build_graph(p)
        (Path(p.run_dir) / "cycle1" / "branch").mkdir(parents=True)
        os.symlink(Path(base.run_dir) / G.branch_dir(1, "biology"), Path(p.run_dir) / G.branch_dir(1, "biology"))
        os.symlink(Path(base.run_dir) / "forest", Path(p.run_dir) / "forest")
        for node in ("seed", "seed-merge", "cycle1-branch-biology"):
            g.mark_done(g[node])
    ref = plans["ref300"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    reference = subprocess.Popen([sys.executable, "-m", "megatron_btm.cli", "node", ref.run_dir,
                                  "cycle1-train-biology"], cwd=REPO,
                                 env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    plan = plans["requeue"]
    jobs = build_jobs(plan)
    write_scripts(jobs, tmp / "requeue-scripts")
    (Path(plan.run_dir) / "logs").mkdir()   # SLURM opens --output before the script runs
    job = slurm.sbatch(str(tmp / "requeue-scripts" / jobs[2].script), array="0%16")
    task, run = f"{job}_0", Path(plan.run_dir) / G.expert_run(1, "biology")
    deadline = time.time() + 600
    while not (run / "checkpoints" / "latest").exists():
        assert time.time() < deadline and job_state(task) in ("PENDING", "RUNNING"), job_state(task)
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", task], check=True)
    first = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert not (run / "stage.json").exists(), "the expert finished before the requeue: raise its steps"
    before = {p.name: p.stat().st_ino for p in first.iterdir()}
    wait_idle([job], timeout=900)
    assert reference.wait(timeout=900) == 0, reference.stdout.read()[-3000:]
    info = subprocess.run(["scontrol", "show", "job", task, "-o"], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in info and "Restarts=1" in info, info
    # Resumed, not restarted: the checkpoint it resumed from was left as it was.
    assert {p.name: p.stat().st_ino for p in first.iterdir()} == before
    got = read_json(run / "stage.json")
    want = read_json(Path(ref.run_dir) / G.expert_run(1, "biology") / "stage.json")
    assert got["steps"] == want["steps"] == 300
    assert got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-6, abs=1e-6)
    assert G.build_graph(plan).done("cycle1-train-biology")
