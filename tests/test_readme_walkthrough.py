"""README.md's "Using it" walk-through, run as written: the first ```bash block of the section,
read from README.md (not copied), on a tiny slice of the real corpora with a pico config given
through the variables the block documents (CORPUS, CONFIG). Any failing line fails the test."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("bible", "legal", "code_c")
PICO = """\
model: {num_layers: 2, hidden_size: 32, num_attention_heads: 2, seq_length: 32, vocab_size: 512}
steps: 4
micro_batch_size: 2
global_batch_size: 4
eval_interval: 0
eval_iters: 1
save_interval: 0
optim: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 1}
tensorboard: false
progress: false
"""

pytestmark = pytest.mark.slow


def readme_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split("## Using it", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]


def _slice(corpora: Path, dst: Path, lines: int = 30) -> Path:
    for d in DOMAINS:
        (dst / d).mkdir(parents=True)
        for split in ("train", "valid", "test"):
            rows = (corpora / d / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            (dst / d / f"{split}.jsonl").write_text(
                "\n".join(rows[:lines if split == "train" else 6]) + "\n", encoding="utf-8")
    return dst


def test_readme_walkthrough_runs_as_written(corpora, tmp_path):
    block = readme_block()
    assert block.startswith("CORPUS=") and '"$CONFIG"' in block and "btm eval" in block
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "pico.yaml").write_text(PICO)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "btm"  # `btm` as installed, but running this checkout
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m megatron_btm.cli \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO),
               CORPUS=str(_slice(corpora, tmp_path / "corpus")), CONFIG=str(tmp_path / "pico.yaml"))
    script = "set -euo pipefail\nPS4='+ [$SECONDS s] '\nset -x\n" + block  # times in the log
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"README line failed:\n{proc.stderr[-4000:]}"
    print("\n".join(line for line in proc.stderr.splitlines() if line.startswith("+ [")))
    for out in ("forest/forest.json", "eval.json", "avg-bible/meta.json", "priors/bible.json"):
        assert (work / out).is_file(), out
    assert (work / "hf-bible").is_dir()
