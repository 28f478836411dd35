"""Defects found in review of the pipeline executors: a done node counts as done whatever its
process's exit code; one driver per run_dir; torchrun workers die with their torchrun."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from launch_helpers import mini_plan_dict
from proc_helpers import alive, outlives

from megatron_btm.errors import RunFailedError
from megatron_btm.pipeline import executors
from megatron_btm.pipeline import graph as G
from megatron_btm.pipeline.nodes import freeze
from megatron_btm.pipeline.plan import plan_from_dict
from megatron_btm.pipeline.run import execute

REPO = Path(__file__).resolve().parents[2]


def _plan(tmp_path):
    return plan_from_dict(mini_plan_dict(tmp_path, domains=(("a", "b"),)))


def test_local_done_node_with_nonzero_exit_is_done_not_failed(tmp_path, monkeypatch):
    """A node process that wrote its done-record and then exited non-zero (e.g. a crash in
    teardown) is done: no failed-record beside the done one, and its downstream still runs."""
    plan = _plan(tmp_path)
    graph = G.build_graph(plan)
    freeze(plan)
    script = textwrap.dedent("""
        import sys
        from megatron_btm.pipeline import graph as G
        from megatron_btm.pipeline.nodes import load_frozen
        plan = load_frozen(sys.argv[1]); g = G.build_graph(plan)
        for i in sys.argv[2:]:
            g.mark_done(g[i])
        sys.exit(1 if "seed" in sys.argv[2:] else 0)
    """)
    monkeypatch.setattr(executors, "node_command", lambda plan, group: [
        sys.executable, "-c", script, plan.run_dir, *(n.id for n in group)])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    executors.run_local(plan, graph, parallel=2, log=lambda s: None)   # no NodeFailed
    assert all(graph.done(n.id) for n in graph.nodes)
    assert graph.failure("seed") is None
    assert graph.state("cycle1-merge") == "done"


def test_second_driver_on_a_run_dir_is_refused(tmp_path):
    """`btm resume` while a `btm run` of the same run_dir is alive would run the same nodes
    twice at once (two trainings writing one expert folder): refused, one line."""
    from megatron_btm.pipeline.run import driver_lock
    plan = _plan(tmp_path)
    with driver_lock(plan.run_dir):
        with pytest.raises(RunFailedError, match="another `btm run`.*is still running"):
            execute(plan, executor="inprocess", check=False, log=lambda s: None)
        # a dry run writes nothing and runs nothing: allowed
        execute(plan, executor="inprocess", check=False, dry_run=True, log=lambda s: None)
    assert not (Path(plan.run_dir) / G.GRAPH_DIR / G.PLAN_FILE).exists()


def test_torchrun_worker_node_dies_with_its_torchrun(tmp_path):
    """torchrun starts its workers in a new session and cannot stop them when it is SIGKILLed
    (as PR_SET_PDEATHSIG does to it when the local driver dies): `btm node` under torchrun
    must die with its parent itself, or it keeps training behind a dead driver."""
    ready = tmp_path / "ready"
    worker = f"READY = {str(ready)!r}\n" + textwrap.dedent("""
        import time, types
        from megatron_btm.pipeline import node_cli, nodes
        def hang(run_dir):   # reached after node_cli.run's start: mark it, then "train"
            open(READY, "w").close()
            time.sleep(120)
        nodes.load_frozen = hang
        node_cli.run(types.SimpleNamespace(run_dir="x", nodes=["seed"]))
    """)
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = {{**os.environ, "TORCHELASTIC_RUN_ID": "review", "PYTHONPATH": {str(REPO)!r}}}
        p = subprocess.Popen([sys.executable, "-c", {worker!r}], env=env, start_new_session=True)
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    mid = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child = int(mid.stdout.readline())
    try:
        deadline = time.time() + 120
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert ready.exists(), "the worker never reached node_cli.run"
        os.kill(mid.pid, signal.SIGKILL)
        mid.wait()
        assert not outlives(child, 30), "btm node outlived its torchrun parent"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_run_complete_names_the_forest_the_plan_grows(tmp_path, monkeypatch):
    """A plan extending an existing forest (`forest:`) says that forest, not run_dir/forest."""
    from megatron_btm.pipeline import nodes
    raw = mini_plan_dict(tmp_path, domains=(("a",),))
    raw.pop("seed")
    raw["forest"] = str(tmp_path / "elsewhere" / "forest")
    plan = plan_from_dict(raw)
    monkeypatch.setattr(nodes, "BODIES", {k: (lambda p, n: {}) for k in G.KINDS})
    lines: list[str] = []
    execute(plan, executor="inprocess", check=False, log=lines.append)
    assert f"run complete: forest {raw['forest']};" in lines[-1]


def test_run_after_resume_in_one_process_is_not_a_resume(tmp_path, capsys):
    """`btm resume` once set a module global that made every later `btm run` in the same
    process a resume ("nothing to resume" for a fresh run_dir)."""
    import yaml

    from megatron_btm import cli
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(mini_plan_dict(tmp_path, domains=(("a", "b"),))))
    assert cli.main(["resume", str(plan_file), "--dry-run", "--no-check"]) != 0
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["run", str(plan_file), "--dry-run", "--no-check"]) == 0, capsys.readouterr().err


def test_random_init_seed_merge_runs_in_its_own_node_process(tmp_path):
    """A plan with `seed: {steps: 0}` creates its forest from a random init in the seed-merge
    node; under the local and SLURM executors that node is a fresh process, which must set up
    torch.distributed itself (the checkpoint writer needs a process group)."""
    raw = mini_plan_dict(tmp_path, domains=(("a", "b"),))
    raw["seed"] = {"steps": 0}
    plan = plan_from_dict(raw)
    graph = G.build_graph(plan)
    freeze(plan)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(executors.node_command(plan, [graph["seed-merge"]]), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert graph.done("seed-merge")
    from megatron_btm.forest import Forest
    assert Forest.open(Path(plan.run_dir) / "forest").seed().extra["meta"]["source"] == "random-init"
