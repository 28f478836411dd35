"""`btm merge-moe` / `btm moe remove` on pico forests: one-hot router = the dense expert, uniform
router = the documented formula (hand-written reference), TP=2 / EP=2 loads, opt-out slices."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
import merge_moe_helpers as H  # noqa: E402
import mp_workers  # noqa: E402

from megatron_btm.averaging.torch_dist import TorchDistReader  # noqa: E402
from megatron_btm.moe.merge import MergeMoeConfig, merge_moe  # noqa: E402

SPECS = {
    "same": {"same": True, "experts": {"a": {"domain": "bible"}, "b": {"domain": "legal"},
                                       "c": {"domain": "code_c"}}},
    "diff": {"experts": {"x": {"domain": "bible"}, "y": {"domain": "legal"}, "z": {"domain": "novels"}}},
    "llama": {"model": {"arch": "llama"}, "experts": {"p": {"domain": "bible"}, "q": {"domain": "legal"}}},
}


@pytest.fixture(scope="module")
def forests(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    result = root / "dense.pt"
    mp_workers.spawn(H.build_forests, 1, str(root), json.dumps(SPECS), str(result))
    return root, torch.load(result)


def _merge(root, forest, name, **kw):
    cfg = MergeMoeConfig(forest=str(root / forest), output=str(root / name), router="random",
                         progress=False, **kw)
    merge_moe(cfg)
    return root / name


def _read_all(path):
    r = TorchDistReader(path)
    try:
        return {k: r.read_tensor(k).clone() for k in r.tensors()}
    finally:
        r.close()


def _checks(plan, world=1):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.pt"
        mp_workers.spawn(H.checks_worker, world, json.dumps(plan), str(out))
        return torch.load(out)


def test_merged_tensors_are_the_experts_mlps_and_the_average(forests):
    root, _ = forests
    ckpt = _merge(root, "diff", "diff-t", topk=2)
    from megatron_btm.forest import Forest
    forest = Forest.open(root / "diff")
    dense = [_read_all(forest.checkpoint_path(i)) for i in ("x", "y", "z")]
    moe = _read_all(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["model_config"]["num_moe_experts"] == 3 and meta["model_config"]["moe_router_topk"] == 2
    assert meta["moe_merge"]["expert_ids"] == ["x", "y", "z"]
    assert meta["moe_merge"]["router"]["init"] == "random"
    for key, t in moe.items():
        if ".experts.experts." in key:
            dense_key = key.replace("mlp.experts.experts.", "mlp.")
            for e in range(3):
                assert torch.equal(t[:, e], dense[e][dense_key]), (key, e)
        elif ".router." in key:
            assert t.shape[:2] == (2, 3)
            if key.endswith("bias"):
                assert not t.any()
            else:
                assert t.std().item() == pytest.approx(0.02, rel=0.3)  # Megatron's normal init
        else:
            want = sum(d[key].double() for d in dense) / 3
            assert torch.allclose(t.double(), want, atol=1e-6), key
    assert not [k for k in moe if k.startswith("decoder.layers.mlp.linear_fc")
                and not "layer_norm" in k]


def test_onehot_router_gives_the_dense_expert_and_uniform_router_the_formula(forests):
    root, dense = forests
    same = _merge(root, "same", "same-moe", topk=1)
    diff = _merge(root, "diff", "diff-moe", topk=3)
    plan = [{"name": f"onehot{e}", "ckpt": str(same), "topk": 1, "router": {"onehot": e}} for e in range(3)]
    plan.append({"name": "uniform", "ckpt": str(diff), "topk": 3, "router": "zero"})
    out = _checks(plan)
    for e, eid in enumerate("abc"):
        diff_e = (out[f"onehot{e}"] - dense["same"][eid]).abs().max().item()
        assert diff_e < 1e-5, (eid, diff_e)
    # the other experts' logits are really different (the check can fail)
    assert (dense["same"]["a"] - dense["same"]["b"]).abs().max() > 1e-2
    from megatron_btm.forest import Forest
    forest = Forest.open(root / "diff")
    experts = [_read_all(forest.checkpoint_path(i)) for i in ("x", "y", "z")]
    shared = {k: sum(t[k] for t in experts) / 3 for k in experts[0]}
    # the reference is right: with one expert and weight 1 it is that dense model
    ref_x = H.reference_logits(experts[0], [experts[0]], [1.0], H.IDS)
    assert (ref_x - dense["diff"]["x"]).abs().max() < 1e-5
    ref = H.reference_logits(shared, experts, [1 / 3] * 3, H.IDS)
    assert (out["uniform"] - ref).abs().max() < 1e-5
    assert (out["uniform"] - H.reference_logits(shared, experts[:1], [1.0], H.IDS)).abs().max() > 1e-3
