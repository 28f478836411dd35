"""A real pico plan that ends with the MoE stages, through the local executor (one subprocess per
node): a 2-step seed, one cycle of two experts, merge-moe (hidden router), train-moe
router-only and full, and the eval node's MoE rows. A second `btm run` of the finished plan runs
nothing; a train-moe node requeued after its step-2 checkpoint continues from it and ends with
the weights of the uninterrupted run."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from integrity_helpers import corpus_slice
from pipeline_helpers import PICO, btm

pytestmark = [pytest.mark.slow]   # 10 node processes: ~2 min of CPU, 13 min wall at load 17-27

DOMAINS = ["bible", "legal"]


def _tensors(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    from megatron_btm.averaging.torch_dist import TorchDistReader
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    reader = TorchDistReader(resolve_checkpoint(ckpt))
    try:
        return {k: reader.read_tensor(k).clone() for k in sorted(reader.tensors())
                if k.startswith(prefix) and not k.startswith("optimizer.")}
    finally:
        reader.close()


@pytest.fixture(scope="module")
def run(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-stage")
    corpus = corpus_slice(corpora, root / "corpus", {d: d for d in DOMAINS}, 30)
    btm("preprocess", "--corpus", corpus, "--output", root / "data", "--vocab-size", 384,
        "--tokenizer-train-bytes", 200000, "--workers", 1, "--no-progress")
    plan = {"name": "pico-moe", "run_dir": str(root / "run"), "data_dir": str(root / "data"),
            "train": PICO, "seed": {"domains": DOMAINS, "steps": 2},
            "cycles": [{"domains": DOMAINS, "steps": 2}],
            "branch": {"policy": "topk", "k": 1, "num_sequences": 2},
            "moe": {"topk": 2, "num_sequences": 2,
                    "train": [{"mode": "router-only", "steps": 2},
                              {"mode": "full", "steps": 4, "lr": 0.001, "weights": {"bible": 2},
                               "overrides": {"keep_checkpoints": 2}}]},
            "evaluation": {"domains": ["bible"], "max_blocks": 2, "topk": [1, 2]},
            "executor": {"kind": "local", "parallel": 2}}
    f = root / "plan.yaml"
    f.write_text(yaml.safe_dump(plan))
    out = btm("run", f, timeout=1500)
    return root, f, out


def test_plan_ends_with_the_moe_checkpoint_trained_runs_and_their_eval_rows(run):
    root, f, out = run
    r = root / "run"
    assert btm("status", f).stdout.rstrip().endswith("run complete")
    meta = json.loads((r / "moe/merged/meta.json").read_text())
    assert meta["moe_merge"]["expert_ids"] == DOMAINS and meta["model_config"]["num_moe_experts"] == 2
    assert meta["moe_merge"]["router"]["init"] == "hidden"
    done = {p.stem: json.loads(p.read_text()) for p in (r / "graph/done").glob("*.json")}
    tokens_per_step = PICO["global_batch_size"] * PICO["model"]["seq_length"]
    assert done["train-moe-router-only"]["steps"] == 2
    assert done["train-moe-full"]["tokens"] == 4 * tokens_per_step
    assert done["merge-moe"]["experts"] == DOMAINS
    full = json.loads((r / "moe/full/stage.json").read_text())
    assert full["kind"] == "moe-full" and full["blend"] == {"bible": 2.0, "legal": 1.0}
    assert Path(full["lineage"]["parent"]).resolve() == (r / "moe/merged").resolve()
    # router-only: every tensor but the routers is the merged checkpoint's, bit for bit
    merged, ro = _tensors(r / "moe/merged"), _tensors(r / "moe/router-only")
    assert set(merged) == set(ro)
    for k in merged:
        assert torch.equal(merged[k], ro[k]) != (".mlp.router." in k), k
    table = json.loads((r / "eval/test.json").read_text())
    rows = table["results"]["bible"]
    for name in ("merged", "router-only", "full"):
        for k in (1, 2):
            assert math.isfinite(rows[f"moe/{name}/top{k}"]["ppl"]), (name, k)
    assert rows["moe/full/top2"]["ppl"] != rows["moe/merged/top2"]["ppl"]


def test_second_run_of_the_finished_plan_does_nothing(run):
    root, f, _ = run
    done = root / "run/graph/done"
    before = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    out = btm("run", f)
    assert "started:" not in out.stdout and "run complete" in out.stdout, out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")} == before


def test_requeued_train_moe_continues_from_its_checkpoint(run):
    root, f, _ = run
    r = root / "run"
    ckpts = r / "moe/full/checkpoints"
    want = _tensors(ckpts / "iter_0000004")
    step2 = {p.name: p.stat().st_mtime_ns for p in (ckpts / "iter_0000002").iterdir()}
    # the job was killed after its step-2 checkpoint: no step 4, no stage.json, no done-record
    shutil.rmtree(ckpts / "iter_0000004")
    (ckpts / "latest").write_text("iter_0000002")
    (r / "moe/full/stage.json").unlink()
    (r / "graph/done/train-moe-full.json").unlink()
    out = btm("run", f)
    started = [line for line in out.stdout.splitlines() if "started:" in line]
    assert len(started) == 1 and "train-moe-full" in started[0], out.stdout
    got = _tensors(ckpts / "iter_0000004")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # it continued from step 2 (a run from the start would have saved iter_0000002 again) and
    # the log reads as the uninterrupted run's (rows after the checkpoint are dropped on resume)
    assert {p.name: p.stat().st_mtime_ns for p in (ckpts / "iter_0000002").iterdir()} == step2
    steps = [json.loads(x).get("step") for x in (r / "moe/full/train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4], steps
    assert json.loads((r / "graph/done/train-moe-full.json").read_text())["steps"] == 4
