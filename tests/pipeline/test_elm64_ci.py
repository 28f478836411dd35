"""The CI twin of the 64-domain run (examples/elm64-mini.yaml through bench/elm64_mini.py): the 8
training corpora clustered into 4 domains (btm cluster fit/assign), a seed at 75 % of (seed +
first cycle), 2 cycles x 2 experts as SLURM array tasks through real `sbatch` on the project's
local cluster, branch by posterior top-2, eval over the clusters and the 4 novel domains."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import wait_idle

from megatron_btm.forest import Forest
from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline import slurm_executor
from megatron_btm.pipeline.plan import load_plan
from megatron_btm.utils.io import read_json

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import elm64_mini  # noqa: E402


@pytest.fixture(scope="module")
def run(slurm_cluster, corpora, tmp_path_factory):
    work = tmp_path_factory.mktemp("elm64ci")
    rc = elm64_mini.main(["--run-dir", str(work), "--corpora", str(corpora), "--k", "4", "--cycles", "2",
                          "--train-docs", "40", "--eval-docs", "8", "--ci"])
    assert rc == 0
    plan = load_plan(work / "elm64.yaml")
    ids = [s["job_id"] for subs in read_json(slurm_executor.state_path(plan))["jobs"].values() for s in subs]
    wait_idle(ids, timeout=1500)
    return work, plan


def test_forest_lineage_and_eval_of_the_clustered_plan(run):
    work, plan = run
    run_dir = Path(plan.run_dir)
    status = elm64_mini.subprocess.run([sys.executable, "-m", "megatron_btm.cli", "status", str(work / "elm64.yaml")],
                                       capture_output=True, text=True, cwd=REPO).stdout
    assert status.rstrip().endswith("run complete"), status + "\n".join(
        p.read_text()[-1500:] for p in (run_dir / "logs").glob("*.out"))
    assert plan.seed.steps == 3 * 2 * plan.cycles[0].steps            # 75 % of seed + cycle 1
    assert [c.domains for c in plan.cycles] == [["cluster0", "cluster1"], ["cluster2", "cluster3"]]
    experts = {e.id: e for e in Forest.open(run_dir / "forest").experts()}
    assert sorted(experts) == ["cluster0", "cluster1", "cluster2", "cluster3"]
    for c, cyc in enumerate(plan.cycles, start=1):
        for d in cyc.domains:
            e = experts[d]
            assert e.cycle == c
            branch = read_json(run_dir / G.branch_dir(c, d) / "branch.json")
            assert [p for p, _ in e.parents] == [p["id"] for p in branch["parents"]]
            if c == 1:
                assert [p["id"] for p in branch["parents"]] == ["seed"]
            else:   # top-2 of the forest as it was before cycle 2: the seed and cycle 1's experts
                assert branch["forest_snapshot"] == ["cluster0", "cluster1"]
                assert len(branch["parents"]) == 2
                assert {p["id"] for p in branch["parents"]} <= {"seed", "cluster0", "cluster1"}
    verify = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "forest", "verify", "--forest",
                             str(run_dir / "forest")], capture_output=True, text=True, cwd=REPO)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    results = read_json(run_dir / "eval" / "test.json")
    text = str(results)
    for d in ("glossary", "code_perl", "python_docs", "debian_docs", "cluster0", "cluster3"):
        assert d in text
