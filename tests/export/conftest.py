"""Fixtures for the export tests: a small BPE trained on real text, and pico models trained for
a few steps (far from init, so logits differ across tokens) with Megatron's reference logits."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("export_workers.py")


@pytest.fixture(scope="session")
def tokenizer_path(corpora, tmp_path_factory) -> Path:
    from megatron_btm.data.tokenizer import train_bpe
    src = corpora / "legal" / "train.jsonl"
    d = tmp_path_factory.mktemp("tok")
    with open(src, encoding="utf-8") as f:
        (d / "text.jsonl").write_text("".join(line for _, line in zip(range(200), f)))
    train_bpe([d / "text.jsonl"], 300, d / "tokenizer.json")
    return d / "tokenizer.json"


def _train(workdir: Path, world: int, names: list[str]) -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(WORKER), str(workdir), str(world), *names], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return {n: torch.load(workdir / f"{n}.ref.pt") for n in names}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, dict]:
    """{"tied"|"untied"|"tied_b": {"checkpoint", "tokens" [3, 16], "logits" [3, 16, 384]}}
    (world 1; tied_b = tied's architecture from another init seed)."""
    return _train(tmp_path_factory.mktemp("train1"), 1, ["tied", "untied", "tied_b"])


@pytest.fixture(scope="session")
def trained_tp2(tmp_path_factory) -> dict[str, dict]:
    """{"tp2": ...}: a checkpoint saved by 2 spawned gloo ranks at TP=2."""
    return _train(tmp_path_factory.mktemp("train2"), 2, ["tp2"])
