"""Generated sbatch scripts: golden dry-run of the 64-domain plan, quoting (no injection),
the dependency graph, array specs, and running the scripts' bodies with a fake btm/srun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import fakebtm, mini_plan_dict

from megatron_btm.pipeline import sbatch
from megatron_btm.pipeline.plan import load_plan, plan_from_dict

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "btm-64-domains.dryrun.txt"
EVIL = ["evil $(touch PWNED)", "two  words", "q'uote\"`touch PWNED2`;x"]


def test_dry_run_of_64_domain_plan_matches_golden(tmp_path):
    """Set BTM_UPDATE_GOLDEN=1 to rewrite the golden file after an intended change (review the diff)."""
    # the plan's folders are the cluster's: --no-check renders it without looking for them
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "run",
                          str(REPO / "examples" / "btm-64-domains.yaml"), "--executor", "slurm",
                          "--dry-run", "--no-check"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    if os.environ.get("BTM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(out.stdout)
    assert out.stdout == GOLDEN.read_text()
    assert out.stdout.rstrip().endswith("dry run (slurm): nothing ran, nothing was written")
    scripts = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("===== ")]
    assert len(scripts) == 14 and scripts[0] == "00-seed.sbatch" and scripts[-1] == "05-eval.sbatch"
    assert not any(tmp_path.iterdir())   # a dry run writes nothing
    # Stable and location-independent: no temp dir, no checkout path, no timestamps.
    assert str(tmp_path) not in out.stdout and str(REPO) not in out.stdout
    plan = load_plan(REPO / "examples" / "btm-64-domains.yaml")
    allowed = (plan.run_dir, "/lustre/btm/images/", "/lustre:/lustre")
    for line in out.stdout.splitlines():
        for word in line.replace("=", " ").replace("'", " ").split():
            if word.startswith("/") and not word.startswith("/dev/"):
                assert word.startswith(allowed), f"absolute path not from the plan: {word!r} in {line!r}"


def test_graph_chains_seed_branch_array_merge(tmp_path):
    plan = plan_from_dict(mini_plan_dict(tmp_path, domains=(("a", "b", "c"), ("d",))))
    jobs = sbatch.build_jobs(plan)
    assert [(j.key, j.after) for j in jobs] == [
        ("seed", []), ("cycle1-branch", ["seed"]), ("cycle1-train", ["cycle1-branch"]),
        ("cycle1-merge", ["cycle1-train"]), ("cycle2-branch", ["cycle1-merge"]),
        ("cycle2-train", ["cycle2-branch"]), ("cycle2-merge", ["cycle2-train"])]
    assert jobs[2].array == "0-2%16" and jobs[5].array == "0%16"
    for j in jobs:
        assert "#SBATCH --kill-on-invalid-dep=yes" in j.text and "#SBATCH --requeue" in j.text


@pytest.mark.parametrize("idx, limit, spec", [
    ([0, 1, 2, 3], 16, "0-3%16"), ([2], 4, "2%4"), ([0, 1, 3, 5, 6], 2, "0-1,3,5-6%2")])
def test_array_spec(idx, limit, spec):
    assert sbatch.array_spec(idx, limit) == spec


def _fake_srun(bin_dir: Path) -> None:
    """srun stand-in: drop its options, run the command (no SLURM needed)."""
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)


def test_hostile_domain_names_are_quoted_not_executed(tmp_path):
    """Validation rejects such names (test_plan.py); this is the second layer: even a plan that
    got past it (here: mutated after validation) cannot make a generated script run a command."""
    fake = tmp_path / "fake"
    plan = plan_from_dict(mini_plan_dict(tmp_path, fake, domains=(("x", "y", "z"),)))
    plan.cycles[0].domains = list(EVIL)
    _fake_srun(fake / "bin")
    jobs = sbatch.build_jobs(plan)
    paths = sbatch.write_scripts(jobs, tmp_path / "scripts")
    for p in paths:   # syntax check
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, (p.name, r.stderr)
    train = jobs[2].text
    assert "DOMAINS=('evil $(touch PWNED)' 'two  words' 'q'\"'\"'uote\"`touch PWNED2`;x')" in train
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1"}
    for i, d in enumerate(EVIL):   # each array task, run for real (body only; bash ignores #SBATCH)
        r = subprocess.run(["bash", str(paths[2])], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                           cwd=work, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    for p in (paths[1], paths[3]):   # branch (every domain of the cycle) and merge
        r = subprocess.run(["bash", str(p)], env=env, cwd=work, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert not list(work.glob("PWNED*")) and not list(tmp_path.rglob("PWNED*"))
    calls = fakebtm.read_calls(fake)
    assert fakebtm.trained(calls) == EVIL
    assert [c["node_id"] for c in calls if c["kind"] == "train"] == [f"cycle1-train-{d}" for d in EVIL]
    assert [c["master_port"] for c in calls if c["kind"] == "train"] == [str(20000 + 4242)] * 3
    assert [c["domain"] for c in calls if c["kind"] == "branch"] == EVIL
    assert fakebtm.merged(calls) == [1]
    assert (tmp_path / "run" / "graph" / "done" / "cycle1-merge.json").exists()


def test_array_task_without_domain_fails_clearly(tmp_path):
    fake = tmp_path / "fake"
    plan = plan_from_dict(mini_plan_dict(tmp_path, fake))
    _fake_srun(fake / "bin")
    paths = sbatch.write_scripts(sbatch.build_jobs(plan), tmp_path / "scripts")
    r = subprocess.run(["bash", str(paths[2])], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SLURM_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "7"})
    assert r.returncode == 1 and "no domain for array task 7" in r.stderr
