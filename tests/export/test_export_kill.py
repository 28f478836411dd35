"""kill -9 of `btm export-hf` at several moments: no partial export is visible, the next export
into the same parent folder removes the dead staging, and the finished export is complete."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # three exports in fresh interpreters


def _export(ckpt, tokenizer, out):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "megatron_btm.cli", "export-hf", "--checkpoint",
                             str(ckpt), "--tokenizer", str(tokenizer), "--output", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def _complete(out: Path) -> bool:
    return all((out / f).is_file() for f in ("model.safetensors", "config.json", "btm_export.json",
                                             "tokenizer.json", "README.md"))


@pytest.mark.parametrize("delay", [0.0, 0.2, 1.0])
def test_kill_export(trained, tokenizer_path, tmp_path, delay):
    ckpt = trained["tied"]["checkpoint"]
    proc = _export(ckpt, tokenizer_path, tmp_path / "hf")
    killed = False
    while proc.poll() is None:
        if list(tmp_path.glob(".tmp-hf.*")):
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    proc.communicate()
    out = tmp_path / "hf"
    assert not out.exists() or _complete(out), sorted(p.name for p in out.iterdir())
    assert killed or _complete(out)
    again = _export(ckpt, tokenizer_path, tmp_path / "hf2")   # another export cleans the staging
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    if not out.exists():
        done = _export(ckpt, tokenizer_path, out)
        _, err = done.communicate(timeout=600)
        assert done.returncode == 0, err
    assert _hidden(tmp_path) == [] and _complete(out) and _complete(tmp_path / "hf2")
    assert json.loads((out / "btm_export.json").read_text())["source_checkpoint"]
