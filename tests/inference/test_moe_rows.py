"""`btm eval --moe NAME=C`: rows moe/<NAME>/top<k>, one per active-expert count, next to the
forest's rows (pico MoE, 3 experts)."""
import json
import shutil

import pytest
from inference_helpers import SEQ, run_cli

from megatron_btm.megatron.model import GPTConfig

if "num_moe_experts" not in GPTConfig.__dataclass_fields__:  # pragma: no cover
    pytest.skip("MoE model support (GPTConfig.num_moe_experts) is not on this branch yet",
                allow_module_level=True)


def _moe_checkpoint(world, tmp_path, topk: int = 2):
    from inference_helpers import build_pico

    from megatron_btm.megatron.checkpoint import save_checkpoint
    cfg = GPTConfig(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4,
                    ffn_hidden_size=48, seq_length=SEQ, vocab_size=world.vocab, init_method_std=0.4,
                    init_seed=5, num_moe_experts=3, moe_router_topk=topk)
    return save_checkpoint(tmp_path / f"moe-top{topk}", step=0, model_chunks=[build_pico(cfg)],
                           meta={"model_config": cfg.to_dict()})


def _with_topk(ckpt, topk: int, dest):
    """A copy of the checkpoint whose meta.json routes to `topk` experts (the reference)."""
    shutil.copytree(ckpt, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["model_config"]["moe_router_topk"] = topk
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def test_moe_rows_equal_the_model_run_at_each_topk(world, tmp_path, capsys):
    ckpt = _moe_checkpoint(world, tmp_path)
    top1 = _with_topk(ckpt, 1, tmp_path / "as-top1")
    out = tmp_path / "results.json"
    rc, stdout, _ = run_cli(["eval", "--forest", str(world.forest), "--data", str(world.data),
                             "--domains", "dom0,dom1", "--max-blocks", "4", "--modes", "uniform",
                             "--topk", "1", "--no-progress", "--moe", f"mix={ckpt}",
                             "--checkpoint", f"ref1={top1}", "--checkpoint", f"ref2={ckpt}",
                             "--output", str(out)], capsys)
    assert rc == 0 and "moe/mix/top1" in stdout
    table = json.loads(out.read_text())
    assert {"expert/e0", "ensemble/uniform", "moe/mix/top1", "moe/mix/top2"} <= set(table["rows"])
    for d in ("dom0", "dom1"):
        r = table["results"][d]
        assert r["moe/mix/top1"]["nll"] == pytest.approx(r["model/ref1"]["nll"], abs=1e-9)
        assert r["moe/mix/top2"]["nll"] == pytest.approx(r["model/ref2"]["nll"], abs=1e-9)
        assert abs(r["moe/mix/top1"]["nll"] - r["moe/mix/top2"]["nll"]) > 1e-4  # k matters
        assert r["moe/mix/top1"]["tokens"] == r["expert/e0"]["tokens"]


def test_moe_bad_inputs_are_one_line_errors(world, tmp_path):
    from megatron_btm.inference.forest_eval import moe_rows
    ckpt = _moe_checkpoint(world, tmp_path)
    with pytest.raises(ValueError, match=r"--moe-topk 1,4: k=4 is not in \[1, 3\]"):
        moe_rows({"mix": ckpt}, [1, 4])
    with pytest.raises(ValueError, match="not a mixture-of-experts checkpoint"):
        moe_rows({"dense": world.checkpoints[0]}, [1])
    assert [r for r, _, _ in moe_rows({"mix": ckpt}, [1, 3])] == ["moe/mix/top1", "moe/mix/top3"]
