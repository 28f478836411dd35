"""kill -9 of merge, average and preprocess while their staging exists: no partial output is
visible, the next run removes the staging, `btm forest verify` is clean."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "stages"))
from fake_runs import fake_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a handful of CLI processes, ~1 min on 2 loaded cores


def btm_popen(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "megatron_btm.cli", *map(str, args)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def btm(*args):
    proc = btm_popen(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def kill_when(proc, folder: Path, pattern: str, delay: float) -> bool:
    """SIGKILL `proc` `delay` s after `folder/pattern` appears; False if it finished first."""
    while proc.poll() is None:
        if list(folder.glob(pattern)):
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
            return True
        time.sleep(0.001)
    proc.communicate()
    return False


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".merge-")))


@pytest.mark.parametrize("pattern, delay", [(".tmp-merge-*", 0.0), (".tmp-merge-*", 0.05),
                                            ("experts/.tmp-bible.*", 0.0)])
def test_kill_merge(tmp_path, pattern, delay):
    btm("merge", "--forest", tmp_path / "forest", "--seed",
        "--run", fake_run(tmp_path / "seed", kind="seed", seed=0))
    run = fake_run(tmp_path / "bible", kind="expert", seed=1, domain="bible")
    proc = btm_popen("merge", "--forest", tmp_path / "forest", "--run", run)
    killed = kill_when(proc, tmp_path / "forest", pattern, delay)
    from megatron_btm.forest import Forest
    forest = Forest.open(tmp_path / "forest")
    assert [e.id for e in forest.experts()] in ([], ["bible"])  # never half an expert
    forest.verify()
    assert hidden(tmp_path) == []  # nothing beside the forest
    if killed and not forest.experts():  # its staging is left: verify reports it
        assert forest.leftovers()
        from megatron_btm import cli
        assert cli.main(["forest", "verify", "--forest", str(forest.root)]) == 2
    btm("merge", "--forest", tmp_path / "forest", "--run", run)  # the next run cleans up
    assert [e.id for e in forest.experts()] == ["bible"]
    assert hidden(tmp_path / "forest") == [] and hidden(tmp_path / "forest" / "experts") == []
    out = btm("forest", "verify", "--forest", tmp_path / "forest")
    assert "ok  bible" in out, (killed, out)


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_kill_average(tmp_path, delay):
    sys.path.insert(0, str(REPO / "tests" / "averaging"))
    from averaging_helpers import tiny_state, write_checkpoint
    a = write_checkpoint(tmp_path / "a", tiny_state(1))
    b = write_checkpoint(tmp_path / "b", tiny_state(2))
    proc = btm_popen("average", "--checkpoint", f"{a},{b}", "--output", tmp_path / "avg",
                     "--no-progress")
    killed = kill_when(proc, tmp_path, ".tmp-avg.*", delay)
    assert killed or delay > 0
    assert not (tmp_path / "avg").exists() or (tmp_path / "avg" / "meta.json").is_file()
    btm("average", "--checkpoint", f"{a},{b}", "--output", tmp_path / "avg2", "--no-progress")
    leftover = hidden(tmp_path)
    if not (tmp_path / "avg").exists():
        btm("average", "--checkpoint", f"{a},{b}", "--output", tmp_path / "avg", "--no-progress")
        leftover = hidden(tmp_path)
    assert leftover == [] and (tmp_path / "avg" / "meta.json").is_file()


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_kill_preprocess(tmp_path, corpora, delay):
    corpus = tmp_path / "corpus"
    for d in ("bible", "legal"):
        (corpus / d).mkdir(parents=True)
        for split in ("train", "valid"):
            rows = (corpora / d / f"{split}.jsonl").read_text().splitlines()[:20]
            (corpus / d / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    args = ("preprocess", "--corpus", corpus, "--output", tmp_path / "data", "--vocab-size", 300,
            "--splits", "train,valid", "--no-progress", "--workers", 1)
    kill_when(btm_popen(*args), tmp_path, ".tmp-data.*", delay)
    if not (tmp_path / "data").exists():  # killed before the rename: nothing visible
        btm(*args)
    assert hidden(tmp_path) == [] and (tmp_path / "data" / "tokenizer.json").is_file()
