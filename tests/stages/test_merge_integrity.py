"""Merging is idempotent (also concurrently), verifies the run's checkpoint before copying it,
keeps one run one expert, records the tokenizer, and `forest verify` catches ghost parents."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_runs import TOKENIZER_A, TOKENIZER_B, fake_run  # noqa: E402

from megatron_btm.errors import CheckpointError, ForestError, TokenizerError  # noqa: E402
from megatron_btm.forest import Forest  # noqa: E402
from megatron_btm.stages.merge import merge_expert, merge_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def forest(tmp_path):
    merge_seed(tmp_path / "forest", fake_run(tmp_path / "seed", kind="seed", seed=0))
    return Forest.open(tmp_path / "forest")


def test_forest_records_its_tokenizer_and_refuses_an_expert_of_another(forest, tmp_path):
    assert forest.tokenizer()["sha256"] == TOKENIZER_A
    run = fake_run(tmp_path / "other", kind="expert", seed=1, domain="bible", tokenizer=TOKENIZER_B)
    with pytest.raises(TokenizerError, match="tokenizer mismatch.*aaaa.*bbbb"):
        merge_expert(forest.root, run)
    assert forest.experts() == []


def test_merging_the_same_run_again_is_a_no_op(forest, tmp_path):
    run = fake_run(tmp_path / "bible", kind="expert", seed=1, domain="bible")
    first = merge_expert(forest.root, run)
    assert first.extra["tokenizer_sha256"] == TOKENIZER_A
    assert merge_expert(forest.root, run) == first
    with pytest.raises(ForestError, match="already merged as expert 'bible'"):
        merge_expert(forest.root, run, expert_id="bible2")
    assert [e.id for e in forest.experts()] == ["bible"]
    assert forest.verify() == ["seed", "bible"] and forest.leftovers() == []


def test_a_flipped_byte_in_the_run_checkpoint_is_not_merged(forest, tmp_path):
    run = fake_run(tmp_path / "bible", kind="expert", seed=1, domain="bible")
    data = next(p for p in (run / "checkpoints" / "iter_0000004").iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{data.name}.*changed since; not merged"):
        merge_expert(forest.root, run)
    assert forest.experts() == [] and forest.leftovers() == []


def test_verify_catches_a_ghost_parent(forest, tmp_path):
    merge_expert(forest.root, fake_run(tmp_path / "bible", kind="expert", seed=1, domain="bible"))
    path = forest.root / "forest.json"
    doc = json.loads(path.read_text())
    doc["experts"]["bible"]["parents"].append({"id": "ghost", "weight": 0.5})
    path.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "forest", "verify",
                           "--forest", str(forest.root)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "parent 'ghost'" in proc.stderr, proc.stderr


def test_merge_cli_parents_for_a_run_without_branch_record(forest, tmp_path):
    run = fake_run(tmp_path / "rand", kind="expert", seed=3, domain="legal")
    stage = json.loads((run / "stage.json").read_text())
    stage["branch"] = None
    (run / "stage.json").write_text(json.dumps(stage))
    args = [sys.executable, "-m", "megatron_btm.cli", "merge", "--forest", str(forest.root),
            "--run", str(run), "--cycle", "1"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "--parents" in proc.stderr
    proc = subprocess.run(args + ["--parents", "seed:1"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert forest.get("legal").parents == (("seed", 1.0),)


def test_concurrent_merges_of_one_run_register_one_expert(forest, tmp_path):
    """3 processes merge the same run at once, 20 times over (a fresh forest each time)."""
    run = fake_run(tmp_path / "bible", kind="expert", seed=1, domain="bible")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    workers = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "merge_worker.py")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(3)]
    try:
        for rep in range(20):
            root = tmp_path / f"f{rep}"
            shutil.copytree(forest.root, root)
            for w in workers:
                w.stdin.write(f"{root} {run}\n")
                w.stdin.flush()
            answers = [w.stdout.readline().strip() for w in workers]
            assert answers == ["ok bible"] * 3, (rep, answers)
            again = Forest.open(root)
            assert [e.id for e in again.experts()] == ["bible"]
            assert again.verify() == ["seed", "bible"] and again.leftovers() == []
    finally:
        for w in workers:
            w.stdin.close()
            w.wait(timeout=60)


def test_weights_only_copy_is_byte_identical_across_merges(tmp_path):
    """Two merges of one run (into two forests, staged under different random names) write the
    same checkpoint bytes: DCP's save_id comes from the content, its checkpoint_id is the name."""
    seed = fake_run(tmp_path / "seed", kind="seed", seed=0)
    run = fake_run(tmp_path / "bible", kind="expert", seed=1, domain="bible")
    copies = []
    for f in ("f1", "f2"):
        merge_seed(tmp_path / f, seed)
        merge_expert(tmp_path / f, run)
        copies.append(Forest.open(tmp_path / f).checkpoint_path("bible"))
    names = sorted(p.name for p in copies[0].iterdir())
    assert ".metadata" in names and names == sorted(p.name for p in copies[1].iterdir())
    for name in names:
        assert (copies[0] / name).read_bytes() == (copies[1] / name).read_bytes(), name
    other = fake_run(tmp_path / "legal", kind="expert", seed=2, domain="legal")
    merge_expert(tmp_path / "f1", other)  # other weights: another save_id
    third = Forest.open(tmp_path / "f1").checkpoint_path("legal")
    assert (third / ".metadata").read_bytes() != (copies[0] / ".metadata").read_bytes()
