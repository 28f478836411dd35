"""examples/paper-ci.yaml end to end (2 training domains + 1 novel, pico GPT), then a resume."""
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORPORA = REPO.parent / "shared" / "corpora"
PLAN = REPO / "examples" / "paper-ci.yaml"
UNITS = ["dense-s1234", "dense-s4321", "btm-f0.00", "btm-f0.50", "novel-code_perl",
         "removal-legal", "random-split"]

pytestmark = pytest.mark.slow


def run_experiment(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "experiment", str(PLAN),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def out(corpora, tmp_path_factory):
    assert corpora.resolve() == CORPORA.resolve(), "paper-ci.yaml names ../shared/corpora"
    out = tmp_path_factory.mktemp("paper-ci") / "out"
    run_experiment(out)
    return out


def unit(out, name):
    return json.loads((out / "runs" / f"{name}.json").read_text())


def stage(path: Path):
    return json.loads((path / "stage.json").read_text())


def test_every_unit_report_and_environment(out):
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(UNITS)
    for f in ("report.md", "results.json", "ppl_by_domain.png", "seed_fraction.png"):
        assert (out / f).stat().st_size > 0
    env = json.loads((out / "environment.json").read_text())
    import torch
    assert env["torch"] == torch.__version__
    assert env["megatron-core"] == importlib.metadata.version("megatron-core")
    assert env["command"].startswith("btm experiment ") and str(PLAN) in env["command"]
    text = (out / "report.md").read_text()
    assert f"megatron-core: {env['megatron-core']}" in text and "## Claims" in text
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7."):
        assert heading in text


def test_dense_baselines_are_compute_matched(out):
    work = out / "work"
    for f in ("0.50", "0.00"):
        seed = work / f"btm-f{f}" / "seed"
        tokens = (stage(seed)["tokens"] if seed.exists() else 0) + sum(
            stage(work / f"btm-f{f}" / "cycle1" / "experts" / d)["tokens"] for d in ("bible", "legal"))
        assert tokens == unit(out, f"btm-f{f}")["compute"]["tokens"]
        for s in (1234, 4321):
            assert stage(work / f"dense-s{s}" / "run")["tokens"] == tokens == 12 * 512
    assert stage(work / "btm-f0.50" / "seed")["tokens"] == 6 * 512
    d1, d2 = (unit(out, f"dense-s{s}")["test"]["bible"]["model/dense"]["nll"] for s in (1234, 4321))
    assert d1 != d2  # two seeds really are two runs


def test_forests_removal_and_ablation(out):
    from megatron_btm.forest import Forest
    main = Forest.open(out / "work" / "btm-f0.50" / "forest")
    assert sorted(e.id for e in main.experts()) == ["bible", "legal"]
    zero = Forest.open(out / "work" / "btm-f0.00" / "forest")
    assert zero.seed().extra.get("meta", {}).get("kind") == "random-init"
    removed = Forest.open(out / "work" / "removal-legal" / "forest")
    assert [e.id for e in removed.experts()] == ["bible"]
    assert [r["id"] for r in removed.removed()] == ["legal"]
    # one expert left: its ensemble on every domain is that expert alone
    before, after = unit(out, "btm-f0.50")["test"], unit(out, "removal-legal")["test"]
    for d in ("bible", "legal"):
        assert after[d]["ensemble/cached"]["nll"] == pytest.approx(before[d]["expert/bible"]["nll"], rel=1e-9)
    rnd = Forest.open(out / "work" / "random-split" / "forest")
    assert sorted(e.id for e in rnd.experts()) == ["random0", "random1"]
    assert rnd.seed().checkpoint_sha256 == main.seed().checkpoint_sha256  # the same seed LM
    novel = unit(out, "novel-code_perl")
    parents = novel["parents"]["branch-top2"]
    assert {p["id"] for p in parents} == {"bible", "legal"}
    assert sum(p["weight"] for p in parents) == pytest.approx(1.0)
    assert novel["parents"]["branch-seed"] == [{"id": "seed", "weight": 1.0}]
    table = before["bible"]
    prior = unit(out, "btm-f0.50")["priors"]["bible"]
    best = ["bible", "legal"][prior.index(max(prior))]
    assert table["model/argmax-average"]["nll"] == table[f"expert/{best}"]["nll"]


def test_rerun_skips_finished_units_and_recomputes_a_missing_one(out):
    first = unit(out, "random-split")
    expert_stage = out / "work" / "random-split" / "cycle1" / "experts" / "random0" / "stage.json"
    mtime = expert_stage.stat().st_mtime_ns
    (out / "runs" / "random-split.json").unlink()
    (out / "report.md").unlink()
    proc = run_experiment(out)
    for name in UNITS:
        if name != "random-split":
            assert f"== {name}: done" in proc.stdout
    assert "== random-split\n" in proc.stdout
    assert expert_stage.stat().st_mtime_ns == mtime  # trained runs are not re-trained
    again = unit(out, "random-split")
    assert again["test"] == first["test"]  # evaluation is deterministic
    assert (out / "report.md").is_file()
    env = json.loads((out / "environment.json").read_text())
    assert len(env["commands"]) == 2
    assert [inv["units"] for inv in env["invocations"]][-1] == ["random-split"]  # only the re-run unit
    assert all(inv["git_commit"] == env["git_commit"] for inv in env["invocations"])
