"""What tests/moe/test_train_moe.py and test_train_moe_bias.py share: a bible+legal pico corpus,
its worker's trainings in one process, and a resume in a new process through the CLI."""
import os
import subprocess
import sys
from pathlib import Path

from integrity_helpers import corpus_slice

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENV = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{HERE.parent}")


def run_worker(corpora: Path, root: Path, worker: str, rows: int) -> Path:
    """Slice and preprocess the corpus under root, run HERE/worker ROOT DATA; return DATA."""
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    corpus = corpus_slice(corpora, root / "corpus", {"bible": "bible", "legal": "legal"}, rows)
    preprocess(PreprocessConfig(corpus_dir=str(corpus), output_dir=str(root / "data"),
                                vocab_size=300, workers=1, progress=False))
    proc = subprocess.run([sys.executable, str(HERE / worker), str(root), str(root / "data")],
                          cwd=REPO, capture_output=True, text=True, env=ENV, timeout=1200)
    assert proc.returncode == 0 and (root / "done").exists(), proc.stderr[-4000:]
    return root / "data"


def resume(args: list) -> None:
    """`btm ARGS` in a new process (the stopped run continued by the uninterrupted run's command)."""
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)], cwd=REPO,
                         capture_output=True, text=True, timeout=1200, env=ENV)
    assert out.returncode == 0, out.stderr[-4000:]
