"""`btm train-moe` on a pico MoE (2 layers, hidden 32, 4 experts, top-2, TP=1) made by
`btm train-seed --set model.num_moe_experts=4`: router-only freezes every other tensor bit for
bit, full trains the experts and lowers the loss, the load-balancing loss is logged and enters
the gradient, a stopped and resumed run ends with the weights of an uninterrupted one, and the
checkpoint loads in `btm eval --moe`. Bad input (fast, no training): test_train_moe_errors.py."""
import json
import sys
from pathlib import Path

import pytest

from moe_train_helpers import resume, run_worker

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import train_moe_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow  # 7 pico trainings in one process + a resume, ~3 min loaded


@pytest.fixture(scope="module")
def runs(corpora, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-moe")
    data = run_worker(corpora, root, "train_moe_worker.py", 30)
    # the stopped run resumed in a new process, by the command of the uninterrupted run
    resume(worker.moe_args(root, data, "resumed", *worker.FULL))
    return root


def _weights(run: Path) -> dict:
    """Model tensors of a run's (or checkpoint's) final checkpoint, by checkpoint key."""
    from megatron_btm.averaging.torch_dist import TorchDistReader
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    reader = TorchDistReader(resolve_checkpoint(run))
    return {k: reader.read_tensor(k) for k in reader.tensors() if not k.startswith("optimizer.")}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in _log(run) if "loss" in r]


def test_router_only_changes_the_routers_and_nothing_else(runs):
    import torch
    parent, trained = _weights(runs / "seed"), _weights(runs / "router")
    assert set(parent) == set(trained)
    routers = [k for k in parent if ".mlp.router." in k]
    assert sorted(routers) == ["decoder.layers.mlp.router.bias", "decoder.layers.mlp.router.weight"]
    for key in routers:
        assert not torch.equal(parent[key], trained[key]), key
    frozen = [k for k in parent if k not in routers]
    assert any("experts" in k for k in frozen) and any("embedding" in k for k in frozen)
    for key in frozen:
        assert torch.equal(parent[key], trained[key]), key
    # the optimizer holds state for the routers only
    from megatron_btm.averaging.torch_dist import TorchDistReader
    from megatron_btm.megatron.checkpoint import resolve_checkpoint
    opt = [k for k in TorchDistReader(resolve_checkpoint(runs / "router")).tensors()
           if k.startswith("optimizer.")]
    assert opt and all(".mlp.router." in k for k in opt), opt


def test_full_trains_the_experts_and_lowers_the_loss(runs):
    import torch
    parent, trained = _weights(runs / "seed"), _weights(runs / "full")
    experts = [k for k in parent if ".mlp.experts." in k]
    assert experts and all(not torch.equal(parent[k], trained[k]) for k in experts)
    assert not torch.equal(parent["embedding.word_embeddings.weight"],
                           trained["embedding.word_embeddings.weight"])
    losses = [r["loss"] for r in _train_rows(runs / "full")]
    assert len(losses) == worker.STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    # and on held-out text: below the parent's validation loss on the same split
    seed_valid = json.loads((runs / "seed" / "stage.json").read_text())["valid_loss"]
    full_valid = json.loads((runs / "full" / "stage.json").read_text())["valid_loss"]
    assert all(full_valid[d] < seed_valid[d] for d in ("bible", "legal")), (seed_valid, full_valid)


def test_aux_loss_is_logged_and_enters_the_gradient(runs):
    import torch
    for run in ("router", "full", "aux1"):
        rows = _train_rows(runs / run)
        # 4 experts, top-2: the switch loss is ~1 when balanced (E * sum f_i p_i)
        assert all(0.5 < r["moe/load_balancing_loss"] < 4.0 for r in rows), rows
    # coefficient 0: the router attaches (and records) no load-balancing loss
    assert all("moe/load_balancing_loss" not in r for r in _train_rows(runs / "aux0"))
    # same first forward (the LM loss logged is the same), different router update
    assert _train_rows(runs / "aux0")[0]["loss"] == _train_rows(runs / "aux1")[0]["loss"]
    a, b = _weights(runs / "aux0"), _weights(runs / "aux1")
    assert not torch.equal(a["decoder.layers.mlp.router.weight"], b["decoder.layers.mlp.router.weight"])
    assert torch.equal(a["decoder.layers.mlp.experts.experts.linear_fc1.weight"],
                       b["decoder.layers.mlp.experts.experts.linear_fc1.weight"])


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(runs):
    import torch
    full, resumed = _weights(runs / "full"), _weights(runs / "resumed")
    assert set(full) == set(resumed)
    for key in full:
        assert torch.equal(full[key], resumed[key]), (key, float((full[key] - resumed[key]).abs().max()))
    assert [r["loss"] for r in _train_rows(runs / "full")] == \
        [r["loss"] for r in _train_rows(runs / "resumed")]
    # it did resume: the stopped run's final validation (step RESUME_AT) is still in the log
    # (a run restarted from step 0 truncates its log to nothing)
    assert any(r["step"] == worker.RESUME_AT and "valid/bible" in r for r in _log(runs / "resumed"))
    assert json.loads((runs / "resumed" / "stage.json").read_text())["steps"] == worker.STEPS


def test_lineage_and_stage_record(runs):
    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    seed_ckpt = resolve_checkpoint(runs / "seed")
    for run, mode in (("router", "router-only"), ("full", "full")):
        meta = read_meta(resolve_checkpoint(runs / run))
        lin = meta["lineage"]
        assert (lin["op"], lin["mode"], lin["parent"], lin["steps"]) == \
            ("train-moe", mode, str(seed_ckpt), worker.STEPS)
        assert lin["blend"] == {"bible": 1.0, "legal": 1.0} and lin["data"].endswith("data")
        assert meta["model_config"]["num_moe_experts"] == 4 and meta["kind"] == f"moe-{mode}"
        stage = json.loads((runs / run / "stage.json").read_text())
        assert stage["mode"] == mode and stage["steps"] == worker.STEPS
        assert meta["moe_merge"]["expert_ids"] == list(worker.EXPERT_IDS)   # carried over


def test_trained_moe_experts_keep_their_ids_for_opt_out(runs, tmp_path):
    """`btm moe remove --expert ID` names an expert of a trained MoE by its merge id."""
    from megatron_btm import cli
    from megatron_btm.megatron.checkpoint import read_meta
    assert cli.main(["moe", "remove", "--checkpoint", str(runs / "router"), "--expert", "y",
                     "--output", str(tmp_path / "minus-y")]) == 0
    meta = read_meta(tmp_path / "minus-y")
    assert meta["model_config"]["num_moe_experts"] == 3
    assert meta["moe_merge"]["expert_ids"] == ["w", "x", "z"]


def test_eval_moe_loads_the_trained_checkpoint(runs):
    from megatron_btm.inference.forest_eval import moe_rows
    rows = moe_rows({"router": runs / "router"}, (1, 2))
    assert [r for r, _, _ in rows] == ["moe/router/top1", "moe/router/top2"]
    from megatron_btm.inference.scoring import model_config_of
    cfg, ckpt = model_config_of(runs / "router")
    assert cfg.num_moe_experts == 4 and ckpt.name == f"iter_{worker.STEPS:07d}"
