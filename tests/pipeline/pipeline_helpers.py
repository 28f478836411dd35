"""A real pico BTM plan (seed + 2 cycles x 3 domains) on slices of ../shared/corpora, and the
comparison of two finished runs: forest lineage and every expert's weights, bitwise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CYCLES = (("bible", "legal", "code_c"), ("biology", "code_python", "novels"))
PICO = {"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 32,
                  "vocab_size": 384},
        "optim": {"lr": 0.003, "min_lr": 0.0003, "warmup_steps": 1}, "steps": 4,
        "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 0, "eval_iters": 1,
        "save_interval": 2, "keep_checkpoints": 1, "tensorboard": False, "progress": False,
        "num_threads": 1}


def btm(*args, env=None, timeout=900, check=True):
    out = subprocess.run([sys.executable, "-m", "megatron_btm.cli", *map(str, args)],
                         capture_output=True, text=True, cwd=REPO, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def make_data(corpora: Path, root: Path) -> Path:
    corpus = root / "corpus"
    for d in {x for c in CYCLES for x in c}:
        (corpus / d).mkdir(parents=True)
        for split, n in (("train", 30), ("valid", 6), ("test", 4)):
            lines = (corpora / d / f"{split}.jsonl").read_text().splitlines()[:n]
            (corpus / d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    btm("preprocess", "--corpus", corpus, "--output", root / "data", "--vocab-size", 384,
        "--tokenizer-train-bytes", 200000, "--workers", 1, "--no-progress")
    return root / "data"


def plan_dict(run_dir: Path, data: Path, **kw) -> dict:
    return {"name": "pico", "run_dir": str(run_dir), "data_dir": str(data), "train": PICO,
            "seed": {"domains": list(CYCLES[0]), "steps": 4},
            "cycles": [{"domains": list(c)} for c in CYCLES],
            "branch": {"policy": "topk", "k": 2, "num_sequences": 4}, **kw}


def forest_summary(run_dir: Path) -> dict:
    """ids, cycles, parents and weights of the forest, and every expert's tensors."""
    from megatron_btm.averaging.torch_dist import TorchDistReader
    from megatron_btm.forest import Forest
    forest = Forest.open(Path(run_dir) / "forest")
    out = {}
    for e in forest.experts():
        reader = TorchDistReader(forest.checkpoint_path(e.id))
        try:
            tensors = {k: reader.read_tensor(k).clone() for k in sorted(reader.tensors())}
        finally:
            reader.close()
        out[e.id] = {"cycle": e.cycle, "domain": e.domain, "parents": list(e.parents),
                     "tensors": tensors}
    return out


def assert_same_forest(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for i in a:
        assert (a[i]["cycle"], a[i]["domain"], a[i]["parents"]) == \
            (b[i]["cycle"], b[i]["domain"], b[i]["parents"]), i
        ta, tb = a[i]["tensors"], b[i]["tensors"]
        assert sorted(ta) == sorted(tb)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{i}: {k} differs"
