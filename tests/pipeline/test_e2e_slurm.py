"""The real thing on the project's local SLURM cluster (CPU, pico model, ../shared/corpora):
seed + 2 cycles x 4 domains through sbatch job arrays and afterok dependencies, checked from the
forest; and a running expert requeued with `scontrol requeue` resumes from its checkpoint and
ends with the same loss as an uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_helpers import job_state, wait_idle

from megatron_btm.launch import commands as C
from megatron_btm.launch import runner, sbatch, slurm
from megatron_btm.launch.plan import load_plan
from megatron_btm.utils.io import read_json

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CORPORA = Path(os.environ.get("BTM_CORPORA", REPO.parent / "shared" / "corpora"))
CYCLES = (("bible", "biology", "changelogs", "code_c"), ("code_perl", "code_python", "debian_docs", "dictionary"))


def _btm(*args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *args], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
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


@pytest.fixture(scope="module")
def e2e(slurm_cluster, tmp_path_factory):
    if not CORPORA.is_dir():
        pytest.skip(f"{CORPORA}: corpora not found (set BTM_CORPORA)")
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = tmp / "corpus"   # a small slice of each domain
    for d in {"glossary", *(d for c in CYCLES for d in c)}:   # glossary: evaluation only
        for split, n in (("train", 40), ("valid", 12), ("test", 4)):
            lines = (CORPORA / d / f"{split}.jsonl").read_text().splitlines()[:n]
            (corpus / d).mkdir(parents=True, exist_ok=True)
            (corpus / d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    _btm("preprocess", "--corpus-dir", str(corpus), "--output-dir", str(tmp / "data"), "--vocab-size", "512",
         "--tokenizer-train-bytes", "400000", "--workers", "1", "--no-progress")
    plan_yaml = _plan_file(tmp, tmp / "data", "mini")
    out = _btm("launch", "slurm", str(plan_yaml), timeout=120)
    plan = load_plan(plan_yaml)
    ids = [s["job_id"] for subs in read_json(runner.state_path(plan))["stages"].values() for s in subs]
    wait_idle(ids, timeout=1500)
    return tmp, plan, plan_yaml, out.stdout


def test_seed_and_two_cycles_build_the_forest_with_lineage(e2e):
    from megatron_btm.forest import Forest
    tmp, plan, plan_yaml, submitted = e2e
    assert "submitted cycle2-merge" in submitted
    st = runner.status(plan)
    assert st.complete(), st.format() + "\n" + "\n".join(
        p.read_text()[-1500:] for p in (Path(plan.run_dir) / "logs").glob("*.out"))
    experts = {e.domain: e for e in Forest.open(Path(plan.run_dir) / "forest").experts()}
    assert sorted(experts) == sorted(d for c in CYCLES for d in c)
    for c, domains in enumerate(CYCLES, start=1):
        for d in domains:
            e = experts[d]
            assert e.cycle == c
            # Independent record: the branch the job trained from (written before training).
            branch = read_json(Path(plan.run_dir) / f"cycle{c}" / "branch" / d / "branch.json")
            assert [p for p, _ in e.parents] == [p["id"] for p in branch["parents"]]
            assert sum(w for _, w in e.parents) == pytest.approx(1.0)
            if c == 1:   # the first cycle branches from the seed
                assert [p for p, _ in e.parents] == ["seed"]
            else:        # later: top-2 of the forest as it was at the start of the cycle
                assert len(e.parents) == 2 and {p for p, _ in e.parents} <= {"seed", *CYCLES[0]}
            stage = read_json(Path(plan.run_dir) / f"cycle{c}" / "experts" / d / "stage.json")
            assert stage["domain"] == d and stage["steps"] == 10
    assert "run complete" in _btm("launch", "status", str(plan_yaml)).stdout
    results = (Path(plan.run_dir) / "eval" / "test.json").read_text()   # the eval job's table
    assert "glossary" in results and "bible" in results


def test_requeued_expert_resumes_from_checkpoint_with_the_same_final_loss(e2e):
    tmp, base, _, _ = e2e
    over = {"save_interval": 20, "keep_checkpoints": 100}
    cycles = [{"domains": ["biology"], "steps": 300, "overrides": over}]
    plans = {n: load_plan(_plan_file(tmp, base.data_dir and Path(base.data_dir), n, cycles=cycles))
             for n in ("requeue", "reference")}
    for p in plans.values():   # both start from the e2e run's branch of biology
        (Path(p.run_dir) / "cycle1" / "branch").mkdir(parents=True)
        os.symlink(Path(base.run_dir) / "cycle1" / "branch" / "biology", Path(p.run_dir) / "cycle1" / "branch" / "biology")
    ref = plans["reference"]
    ref_argv = C.render_argv(C.train_expert(ref, ref.cycles[0], "biology"), {**C.plan_values(ref), "DOMAIN": "biology"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    reference = subprocess.Popen([sys.executable, "-m", "megatron_btm.cli", *ref_argv], cwd=REPO,
                                 env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    plan = plans["requeue"]
    jobs = sbatch.build_jobs(plan)
    sbatch.write_scripts(jobs, tmp / "requeue-scripts")
    (Path(plan.run_dir) / "logs").mkdir()   # SLURM opens --output before the script runs
    job = slurm.sbatch(str(tmp / "requeue-scripts" / jobs[2].script), array="0%16")
    task, run = f"{job}_0", Path(plan.run_dir) / "cycle1" / "experts" / "biology"
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
    want = read_json(Path(ref.run_dir) / "cycle1" / "experts" / "biology" / "stage.json")
    assert got["steps"] == want["steps"] == 300
    assert got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-6, abs=1e-6)
