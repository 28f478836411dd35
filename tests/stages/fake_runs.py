"""Finished run folders without training: a small torch_dist checkpoint + stage.json + run.json
(what `btm train-*` writes), for merge tests that must be fast."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "averaging"))
from averaging_helpers import MODEL_CONFIG, tiny_state, write_checkpoint  # noqa: E402

TOKENIZER_A = "a" * 64
TOKENIZER_B = "b" * 64


def fake_run(run_dir: Path, *, kind: str, seed: int, domain: str | None = None,
             tokenizer: str = TOKENIZER_A, parents=(("seed", 1.0),), cycle: int = 1) -> Path:
    from megatron_btm.forest.staging import hash_tree
    ckpt = run_dir / "checkpoints" / "iter_0000004"
    write_checkpoint(ckpt, tiny_state(seed))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.update(tokenizer_sha256=tokenizer, step=4)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text("iter_0000004\n")
    blend = {domain: 1.0} if domain else {"bible": 1.0, "legal": 1.0}
    (run_dir / "run.json").write_text(json.dumps({
        "kind": kind, "blend": blend, "tokenizer_sha256": tokenizer,
        "model_config": MODEL_CONFIG, "train_config": {"steps": 4}}))
    stage = {"kind": kind, "blend": blend, "steps": 4, "tokens": 64, "device_seconds": 0.1,
             "final_loss": 1.0, "valid_loss": {}, "checkpoint": ckpt.name,
             "tokenizer_sha256": tokenizer, "tokenizer_vocab_size": 16,
             "checkpoint_files": hash_tree(ckpt), "finished": "2026-01-01T00:00:00+00:00"}
    if kind == "expert":
        stage.update(domain=domain, branch={"parents": [{"id": p, "weight": w} for p, w in parents],
                                            "cycle": cycle, "domain": domain})
    (run_dir / "stage.json").write_text(json.dumps(stage))
    return run_dir
