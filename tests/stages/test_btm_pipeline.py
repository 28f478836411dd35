"""Seed → cycle 1 (seed copies) → cycle 2 (posterior top-k branch) on real text, tiny models."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ["bible", "legal", "code_c"]
TINY = REPO / "examples" / "tiny.yaml"
SETS = ["steps=8", "save_interval=4", "eval_interval=0", "model.vocab_size=512"]

pytestmark = pytest.mark.slow


def btm(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _slice_corpus(corpora: Path, dst: Path, domains, lines=40):
    for d in domains:
        (dst / d).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            src = (corpora / d / f"{split}.jsonl").read_text().splitlines()[:lines if split == "train" else 8]
            (dst / d / f"{split}.jsonl").write_text("\n".join(src) + "\n")


@pytest.fixture(scope="module")
def forest_run(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("btm")
    _slice_corpus(corpora, root / "corpus", DOMAINS)
    btm("preprocess", "--corpus", root / "corpus", "--output", root / "data",
        "--vocab-size", 512, "--no-progress")
    sets = [x for s in SETS for x in ("--set", s)]
    btm("train-seed", "--config", TINY, *sets, "--data", root / "data", "--domains", ",".join(DOMAINS),
        "--output", root / "seed")
    btm("merge", "--forest", root / "forest", "--seed", "--run", root / "seed")
    btm("cycle", "--forest", root / "forest", "--data", root / "data", "--domains", "bible,legal",
        "--output", root / "cycle1", "--config", TINY, *sets, "--parallel", 2)
    btm("cycle", "--forest", root / "forest", "--data", root / "data", "--domains", "code_c",
        "--output", root / "cycle2", "--config", TINY, *sets, "--policy", "topk", "--k", 2)
    return root


def test_forest_has_experts_with_lineage(forest_run):
    from megatron_btm.forest import Forest
    forest = Forest.open(forest_run / "forest")
    experts = {e.id: e for e in forest.experts()}
    assert set(experts) == set(DOMAINS)
    for d in ("bible", "legal"):
        assert experts[d].cycle == 1 and list(experts[d].parents) == [("seed", 1.0)]
    code = experts["code_c"]
    assert code.cycle == 2
    assert {p for p, _ in code.parents} == {"bible", "legal"}
    assert sum(w for _, w in code.parents) == pytest.approx(1.0)
    branch = json.loads((forest_run / "cycle2" / "cycle2" / "branch" / "code_c" / "branch.json").read_text())
    assert branch["forest_snapshot"] == ["bible", "legal"]
    prior = dict(zip(branch["forest_snapshot"], branch["prior"]))
    for p, w in code.parents:  # weights are the prior renormalised over the top-2
        assert w == pytest.approx(prior[p] / sum(prior.values()))
    assert forest.lineage("code_c")[-1][0] == "seed"
    forest.verify()  # every checksum holds


def test_branch_checkpoint_is_the_weighted_average_of_its_parents(forest_run):
    from megatron_btm.forest import Forest
    from tests_stages_util import read_tensor  # noqa: E402
    forest = Forest.open(forest_run / "forest")
    parents = forest.get("code_c").parents
    key = "decoder.layers.self_attention.linear_qkv.weight"
    got = read_tensor(forest_run / "cycle2" / "cycle2" / "branch" / "code_c", key)
    want = sum(w * read_tensor(forest.checkpoint_path(p), key).double() for p, w in parents)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_merge_is_idempotent_and_stage_records_compute(forest_run):
    from megatron_btm.forest import Forest
    before = (forest_run / "forest" / "forest.json").read_text()
    btm("merge", "--forest", forest_run / "forest", "--run", forest_run / "cycle1" / "cycle1" / "experts" / "bible")
    assert (forest_run / "forest" / "forest.json").read_text() == before
    stage = json.loads((forest_run / "cycle1" / "cycle1" / "experts" / "bible" / "stage.json").read_text())
    assert stage["tokens"] == 8 * 8 * 64 and stage["device_seconds"] > 0
    assert Forest.open(forest_run / "forest").get("bible").tokens == stage["tokens"]


def test_train_expert_refuses_mismatched_architecture(forest_run, tmp_path):
    proc = btm("train-expert", "--config", TINY, "--set", "model.hidden_size=32", "--set",
               "model.vocab_size=512", "--data", forest_run / "data", "--domain", "bible",
               "--checkpoint", forest_run / "cycle1" / "cycle1" / "branch" / "bible", "--output", tmp_path / "x",
               check=False)
    assert proc.returncode == 2
    assert "model.hidden_size=64 in the checkpoint but 32 in the config" in proc.stderr


def test_merge_of_unfinished_run_is_refused(forest_run, tmp_path):
    proc = btm("merge", "--forest", forest_run / "forest", "--run", tmp_path, check=False)
    assert proc.returncode == 2 and "stage.json: not found" in proc.stderr


def test_vocab_smaller_than_tokenizer_is_refused(forest_run, tmp_path):
    proc = btm("train-seed", "--config", TINY, "--set", "model.vocab_size=100", "--data",
               forest_run / "data", "--domains", "bible", "--output", tmp_path / "s", check=False)
    assert proc.returncode == 2 and "model.vocab_size=100 is smaller than the vocabulary" in proc.stderr
