"""Tokenizer identity and resume checks on real (pico) runs: data preprocessed with another BPE
of the same vocabulary size is refused by train-expert, a resume, eval and generate, naming both
files and hashes; a resume with another blend / steps / architecture is refused naming the key;
`--allow-change steps` continues and records the change."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integrity_helpers import btm_err, corpus_slice

REPO = Path(__file__).resolve().parents[1]
PICO = ["--set", "model.num_layers=2", "--set", "model.hidden_size=32",
        "--set", "model.num_attention_heads=2", "--set", "model.seq_length=32",
        "--set", "model.vocab_size=320", "--set", "micro_batch_size=2",
        "--set", "global_batch_size=4", "--set", "eval_interval=0", "--set", "eval_iters=1",
        "--set", "save_interval=2", "--set", "tensorboard=false", "--set", "progress=false",
        "--set", "optim.warmup_steps=1"]

pytestmark = pytest.mark.slow  # 3 pico trainings, ~1.5 min on 2 loaded cores


def btm_sub(*args):
    proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc




@pytest.fixture(scope="module")
def world(corpora, tmp_path_factory):
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    from megatron_btm.stages.merge import merge_expert, merge_seed
    root = tmp_path_factory.mktemp("integrity")
    for name, sources in (("A", {"bible": "bible", "legal": "legal"}),
                          ("B", {"bible": "code_c", "legal": "code_python"})):  # another BPE
        preprocess(PreprocessConfig(corpus_dir=str(corpus_slice(corpora, root / f"corpus{name}", sources, 30)),
                                    output_dir=str(root / f"data{name}"), vocab_size=300,
                                    workers=1, progress=False))
    btm_sub("train-seed", *PICO, "--set", "steps=4", "--data", root / "dataA",
            "--domains", "bible,legal", "--output", root / "seed")
    merge_seed(root / "forest", root / "seed")
    btm_sub("train-expert", *PICO, "--set", "steps=2", "--data", root / "dataA", "--domain",
            "bible", "--checkpoint", root / "forest" / "seed" / "checkpoint", "--output",
            root / "bible")
    merge_expert(root / "forest", root / "bible", parents=[("seed", 1.0)], cycle=1)
    return root


def _mismatch(err: str, *names: str) -> None:
    assert "tokenizer mismatch" in err and err.count("sha256") >= 1, err
    for n in names:
        assert n in err, (n, err)


def test_same_vocab_size_other_bpe(world):
    a = json.loads((world / "dataA" / "tokenizer.json").read_text())["model"]["vocab"]
    b = json.loads((world / "dataB" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(a) == len(b) and a != b  # only the hash tells them apart


def test_train_expert_refuses_data_of_another_tokenizer(world, capsys):
    err = btm_err(capsys, "train-expert", *PICO, "--data", world / "dataB", "--domain", "bible",
                  "--checkpoint", world / "forest" / "seed" / "checkpoint",
                  "--output", world / "refused")
    _mismatch(err, "dataB/tokenizer.json", "checkpoint/meta.json")
    assert not (world / "refused").exists()


def test_resume_refuses_another_tokenizer_blend_steps_architecture(world, capsys):
    run = ["train-seed", *PICO, "--output", world / "seed"]
    err = btm_err(capsys, *run, "--set", "steps=4", "--data", world / "dataB",
                  "--domains", "bible,legal")
    assert "run.json" in err and "tokenizer" in err
    for sets, domains, key in ((["--set", "steps=4"], "legal", "blend"),
                               (["--set", "steps=40"], "bible,legal", "steps"),
                               (["--set", "steps=4", "--set", "model.hidden_size=64"],
                                "bible,legal", "model.hidden_size")):
        err = btm_err(capsys, *run, *sets, "--data", world / "dataA", "--domains", domains)
        assert f"different {key} " in err and "run.json" in err, err


def test_allow_change_steps_continues_and_records_it(world):
    btm_sub("train-seed", *PICO, "--set", "steps=6", "--data", world / "dataA", "--domains",
            "bible,legal", "--output", world / "seed", "--allow-change", "steps")
    run = json.loads((world / "seed" / "run.json").read_text())
    assert run["resume_changes"] == [{"key": "steps", "old": 4, "new": 6}]
    assert json.loads((world / "seed" / "stage.json").read_text())["steps"] == 6
    # the schedule was re-planned for 6 steps: step 5 still decays (the 4-step plan had ended
    # its decay at min_lr by then), step 6 reaches min_lr
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (world / "seed" / "train_log.jsonl")
                                           .read_text().splitlines()) if "lr" in r}
    min_lr = 1e-4   # OptimConfig's default
    assert lrs[5] > min_lr * 1.01 and lrs[6] == pytest.approx(min_lr, rel=1e-6)


def test_eval_refuses_data_of_another_tokenizer_topk_and_existing_output(world, capsys):
    ev = ["eval", "--forest", world / "forest", "--domains", "bible", "--max-blocks", 2]
    err = btm_err(capsys, *ev, "--data", world / "dataB", "--output", world / "e.json")
    _mismatch(err, "dataB/tokenizer.json")
    err = btm_err(capsys, *ev, "--data", world / "dataA", "--topk", "1,5",
                  "--output", world / "e.json")
    assert "k=5" in err and "1 experts" in err
    (world / "exists.json").write_text("{}")
    err = btm_err(capsys, *ev, "--data", world / "dataA", "--output", world / "exists.json")
    assert "--overwrite" in err and (world / "exists.json").read_text() == "{}"


def test_generate_refuses_a_tokenizer_of_another_bpe(world, capsys):
    err = btm_err(capsys, "generate", "--forest", world / "forest", "--prompt", "In the",
                  "--tokenizer", world / "dataB" / "tokenizer.json", "--max-new-tokens", 2)
    _mismatch(err, "dataB/tokenizer.json")


def test_export_hf_refuses_a_tokenizer_of_another_bpe(world, capsys):
    out = world / "hf-refused"
    err = btm_err(capsys, "export-hf", "--forest", world / "forest", "--expert", "bible",
                  "--tokenizer", world / "dataB" / "tokenizer.json", "--output", out)
    _mismatch(err, "dataB/tokenizer.json")
    assert not out.exists()
    err = btm_err(capsys, "export-hf", "--checkpoint", world / "forest" / "seed" / "checkpoint",
                  "--tokenizer", world / "dataB" / "tokenizer.json", "--output", out)
    _mismatch(err, "dataB/tokenizer.json")
    assert not out.exists()
