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
    "mixed": {"experts": {"m1": {"domain": "bible"}, "m2": {"domain": "legal", "model": {"ffn_hidden_size": 64}},
                          "m3": {"domain": "novels", "model": {"vocab_size": 200}}}},
}


@pytest.fixture(scope="module")
def forests(tmp_path_factory):
    """The pico forests of SPECS and {forest: {expert: dense logits}}; the Llama forest has a
    real (300-token BPE) tokenizer, for the Hugging Face export."""
    from megatron_btm.data.identity import tokenizer_of
    from megatron_btm.data.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("moe")
    lines = ['{"text": "in the beginning %d was the word; int main() { return %d; }"}\n' % (i, i) for i in range(100)]
    (root / "text.jsonl").write_text("".join(lines))
    train_bpe([root / "text.jsonl"], 300, root / "tokenizer.json")
    specs = dict(SPECS, llama=dict(SPECS["llama"], tokenizer=tokenizer_of(root / "tokenizer.json"),
                                   model={"arch": "llama", "vocab_size": 300}))
    result = root / "dense.pt"
    mp_workers.spawn(H.build_forests, 1, str(root), json.dumps(specs), str(result))
    return root, torch.load(result)


@pytest.fixture(scope="module")
def merged(forests):
    """MoE checkpoints (random router) of the pico forests, and two opt-outs."""
    from megatron_btm.moe.remove import remove_expert
    root, _ = forests
    out = {"same": _merge(root, "same", "same-moe", topk=1), "diff": _merge(root, "diff", "diff-moe", topk=3),
           "llama": _merge(root, "llama", "llama-moe", topk=2)}
    with pytest.warns(UserWarning, match="moe_router_topk 3 clamped to 2"):
        out["diff-rm"] = root / "diff-rm"
        remove_expert(out["diff"], "y", out["diff-rm"], progress=False)
    out["same-rm"] = root / "same-rm"
    remove_expert(out["same"], "b", out["same-rm"], progress=False)
    return out


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
                and "layer_norm" not in k]


@pytest.fixture(scope="module")
def model_checks(merged):
    """Logits of the merged checkpoints as Megatron models (one spawned process)."""
    plan = [{"name": f"onehot{e}", "ckpt": str(merged["same"]), "topk": 1, "router": {"onehot": e}}
            for e in range(3)]
    plan += [{"name": f"rm{e}", "ckpt": str(merged["same-rm"]), "topk": 1, "router": {"onehot": e}}
             for e in range(2)]
    plan.append({"name": "uniform", "ckpt": str(merged["diff"]), "topk": 3, "router": "zero"})
    plan.append({"name": "llama", "ckpt": str(merged["llama"])})
    return _checks(plan)


def test_onehot_router_gives_the_dense_expert_and_uniform_router_the_formula(forests, model_checks):
    root, dense = forests
    out = model_checks
    for e, eid in enumerate("abc"):
        diff_e = (out[f"onehot{e}"] - dense["same"][eid]).abs().max().item()
        assert diff_e < 1e-5, (eid, diff_e)
    for e, eid in enumerate("ac"):  # after `moe remove b`, expert 1 is c
        assert (out[f"rm{e}"] - dense["same"][eid]).abs().max().item() < 1e-5, eid
    # the experts' logits are really different (the checks can fail)
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


def test_remove_drops_the_slice_and_keeps_every_other_tensor(merged):
    before, after = _read_all(merged["diff"]), _read_all(merged["diff-rm"])
    assert set(before) == set(after)
    for key, t in before.items():
        if ".experts.experts." in key or ".router." in key:
            assert after[key].shape[1] == 2
            assert torch.equal(after[key][:, 0], t[:, 0]) and torch.equal(after[key][:, 1], t[:, 2]), key
        else:
            assert torch.equal(after[key], t), key
    meta = json.loads((merged["diff-rm"] / "meta.json").read_text())
    assert meta["model_config"]["num_moe_experts"] == 2 and meta["model_config"]["moe_router_topk"] == 2
    assert meta["moe_merge"]["expert_ids"] == ["x", "z"]
    (record,) = meta["moe_removed"]
    assert record["removed"] == "y" and record["index"] == 1 and "clamped" in record["note"]
    assert record["parent"] == str(merged["diff"].resolve())
    objects = TorchDistReader(merged["diff-rm"]).objects()
    assert not [o for o in objects if "_2.3" in o or ".2_" in o] and any(".1_2.2" in o for o in objects)


@pytest.mark.slow
def test_merged_checkpoints_load_at_tp2_and_ep2_with_equal_logits(merged):
    # EP must divide the number of experts: 3-expert "diff" at TP=2 only, its 2-expert opt-out
    # (GPT-2 style, biases) and the Llama-style merge at TP=2 and EP=2
    layouts = {"diff": ("tp2",), "diff-rm": ("tp2", "ep2"), "llama": ("tp2", "ep2")}
    sizes = {"tp1": (1, 1), "tp2": (2, 1), "ep2": (1, 2)}
    plan = [{"name": f"{name}-{lay}", "ckpt": str(merged[name]), "tp": sizes[lay][0], "ep": sizes[lay][1]}
            for name, lays in layouts.items() for lay in ("tp1",) + lays]
    out = _checks(plan, world=2)
    for name, lays in layouts.items():
        for lay in lays:
            assert (out[f"{name}-{lay}"] - out[f"{name}-tp1"]).abs().max() < 1e-5, (name, lay)


def _prior(path, ids):
    from megatron_btm.routing.prior import save_prior
    save_prior(path, torch.full((len(ids),), 1 / len(ids), dtype=torch.float64), ids, "bible")
    return path


@pytest.mark.parametrize("case, match", [
    ("arch", "architecture mismatch: model_config.ffn_hidden_size"),
    ("vocab", "vocab mismatch: model_config.vocab_size=100"),
    ("unknown", "unknown expert 'nope'"),
    ("topk", "--topk 4: larger than the 3 experts merged"),
    ("prior", "expert ids do not match the forest's"),
    ("output", "already exists and is not empty"),
    ("no-data", "--router hidden needs --data"),
    ("remove-unknown", "--expert 'w': not an expert of"),
    ("remove-dense", "not a mixture-of-experts checkpoint"),
])
def test_bad_input_is_one_line_and_writes_nothing(forests, merged, tmp_path, capsys, case, match):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from integrity_helpers import btm_err
    root, _ = forests
    out = tmp_path / "out"
    prior = _prior(tmp_path / "p.json", ["a", "b", "c"])  # the experts of forest "same"
    merge = ["merge-moe", "--output", out, "--router", "random", "--no-progress", "--forest"]
    args = {
        "arch": merge + [root / "mixed", "--experts", "m1,m2"],
        "vocab": merge + [root / "mixed", "--experts", "m1,m3"],
        "unknown": merge + [root / "mixed", "--experts", "m1,nope"],
        "topk": merge + [root / "diff", "--topk", 4],
        "prior": merge + [root / "diff", "--shared", f"posterior:{prior}"],
        "output": merge + [root / "diff"],
        "no-data": ["merge-moe", "--output", out, "--forest", root / "diff"],
        "remove-unknown": ["moe", "remove", "--checkpoint", merged["diff"], "--expert", "w", "--output", out],
        "remove-dense": ["moe", "remove", "--checkpoint", root / "diff-runs" / "x" / "iter_0000001",
                         "--expert", "0", "--output", out],
    }[case]
    if case == "output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    err = btm_err(capsys, *args)
    assert match in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "p.json"] if case == "output" else ["p.json"])
    if case == "output":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_posterior_shared_weights_are_the_prior_over_the_chosen_experts(forests, tmp_path):
    from megatron_btm.routing.prior import save_prior
    root, _ = forests
    prior = tmp_path / "prior.json"
    save_prior(prior, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), ["x", "y", "z"], "bible")
    ckpt = _merge(root, "diff", tmp_path / "post", experts=["z", "x"], shared=f"posterior:{prior}")
    meta = json.loads((ckpt / "meta.json").read_text())["moe_merge"]
    assert meta["expert_ids"] == ["z", "x"] and meta["shared"]["weights"] == pytest.approx([0.2 / 0.7, 0.5 / 0.7])
    from megatron_btm.forest import Forest
    forest = Forest.open(root / "diff")
    z, x = (_read_all(forest.checkpoint_path(i)) for i in ("z", "x"))
    moe = _read_all(ckpt)
    key = "decoder.layers.self_attention.linear_qkv.weight"
    assert torch.allclose(moe[key].double(), (0.2 * z[key].double() + 0.5 * x[key].double()) / 0.7, atol=1e-6)
    assert torch.equal(moe["decoder.layers.mlp.experts.experts.linear_fc1.weight"][:, 0],
                       z["decoder.layers.mlp.linear_fc1.weight"])


def test_llama_moe_exports_to_mixtral_with_equal_logits(forests, merged, model_checks, tmp_path):
    """btm export-hf of a merged Llama-style forest: transformers' MixtralForCausalLM, same logits."""
    from transformers import AutoModelForCausalLM

    from megatron_btm.export import export_checkpoint
    root, _ = forests
    out = export_checkpoint(merged["llama"], tokenizer=root / "tokenizer.json", output=tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        hf = model.float().eval()(H.IDS).logits
    megatron = model_checks["llama"][..., :hf.shape[-1]]
    assert megatron.std() > 0.01  # a random router: logits vary, the comparison is informative
    assert (hf - megatron).abs().max() < 1e-4


def test_an_error_while_writing_leaves_nothing(forests, tmp_path, monkeypatch):
    from megatron_btm.moe import merge
    root, _ = forests

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated, after the shared and expert tensors were written)")

    monkeypatch.setattr(merge, "_write_router", fail)
    with pytest.raises(OSError, match="simulated"):
        _merge(root, "diff", tmp_path / "moe")
    assert list(tmp_path.iterdir()) == []  # no output, no .tmp- staging left behind
