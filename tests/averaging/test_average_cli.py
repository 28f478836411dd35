"""`btm average` from explicit folders and from a forest (with a prior)."""
import json

import pytest
import torch
from averaging_helpers import read_all, tiny_state, write_checkpoint

from megatron_btm.cli import main
from megatron_btm.routing.prior import save_prior


@pytest.fixture
def experts(tmp_path):
    return [write_checkpoint(tmp_path / f"e{i}", tiny_state(i)) for i in range(3)]


KEY = "decoder.layers.self_attention.linear_qkv.weight"


def test_explicit_checkpoints_and_weights(tmp_path, experts, capsys):
    out = tmp_path / "out"
    rc = main(["average", "--checkpoint", f"{experts[0]},{experts[1]}", "--checkpoint", str(experts[2]),
               "--weights", "0.5,0.25,0.25",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["num_tensors"] == 4
    srcs = [read_all(e)[KEY] for e in experts]
    torch.testing.assert_close(read_all(out)[KEY], 0.5 * srcs[0] + 0.25 * srcs[1] + 0.25 * srcs[2])
    assert json.loads((out / "meta.json").read_text())["averaging"]["method"] == "weighted"


def test_cli_errors_are_exit_2_with_message(tmp_path, experts, capsys):
    rc = main(["average", "--checkpoint", *map(str, experts), "--weights", "1", "--output", str(tmp_path / "o")])
    assert rc == 2 and "--weights: 1 values for 3 --checkpoint folders" in capsys.readouterr().err
    rc = main(["average", "--checkpoint", str(experts[0]), str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def forest(tmp_path, experts):
    from megatron_btm.forest import Forest
    f = Forest.create(tmp_path / "forest", seed_checkpoint=experts[0], seed_meta={"step": 0})
    for i, e in enumerate(experts):
        f.add_expert(f"x{i}", domain=f"d{i}", checkpoint_dir=e, parents=[("seed", 1.0)], cycle=1,
                     steps=1, tokens=1, config={})
    return f


def test_forest_topk_with_prior(tmp_path, experts, forest, capsys):
    prior = tmp_path / "prior.json"
    save_prior(prior, torch.tensor([0.1, 0.6, 0.3]), ["x0", "x1", "x2"], "d9")
    out = tmp_path / "avg"
    rc = main(["average", "--forest", str(forest.root), "--method", "topk", "--prior", str(prior),
               "--k", "2", "--output", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    srcs = [read_all(e)[KEY] for e in experts]
    torch.testing.assert_close(read_all(out)[KEY], (0.6 * srcs[1] + 0.3 * srcs[2]) / 0.9)
    meta = json.loads((out / "meta.json").read_text())["averaging"]
    assert meta["method"] == "topk" and meta["expert_ids"] == ["x1", "x2"] and meta["k"] == 2


def test_forest_argmax_is_that_expert_and_k_too_large_refused(tmp_path, experts, forest, capsys):
    prior = tmp_path / "prior.json"
    save_prior(prior, torch.tensor([0.1, 0.2, 0.7]), ["x0", "x1", "x2"], "d9")
    out = tmp_path / "avg"
    assert main(["average", "--forest", str(forest.root), "--method", "argmax", "--prior", str(prior),
                 "--output", str(out), "--no-progress"]) == 0
    assert torch.equal(read_all(out)[KEY], read_all(experts[2])[KEY])
    rc = main(["average", "--forest", str(forest.root), "--method", "topk", "--prior", str(prior),
               "--k", "4", "--output", str(tmp_path / "o2")])
    assert rc == 2 and "k=4: must satisfy 1 <= k <= n, the number of experts (n=3)" in capsys.readouterr().err
    rc = main(["average", "--forest", str(forest.root), "--method", "posterior", "--output", str(tmp_path / "o3")])
    assert rc == 2 and "needs --prior" in capsys.readouterr().err


def test_checkpoints_is_a_deprecated_spelling(tmp_path, experts, capsys):
    out = tmp_path / "out"
    assert main(["average", "--checkpoints", *map(str, experts), "--output", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "--checkpoints is deprecated; use --checkpoint" in captured.err
    assert json.loads(captured.out)["num_tensors"] == 4
    assert main(["average", "--checkpoint", str(experts[0]), "--checkpoint", str(experts[0]),
                 "--output", str(tmp_path / "o")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_forest_methods_are_the_registry_less_weighted():
    from megatron_btm.averaging.cli import FOREST_METHODS
    from megatron_btm.averaging.methods import METHODS
    assert set(FOREST_METHODS) == set(METHODS) - {"weighted"}  # weighted: --checkpoint --weights
