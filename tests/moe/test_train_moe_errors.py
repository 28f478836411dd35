"""`btm train-moe` bad input: one line, exit 2, nothing written. No training runs here: the
checkpoints are meta.json-only stand-ins (every check reads meta.json before any tensor)."""
import json

import pytest

from integrity_helpers import btm_err, corpus_slice

PICO = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 32,
        "vocab_size": 320}


@pytest.fixture(scope="module")
def world(corpora, tmp_path_factory):
    """dataA / dataB (another BPE of the same size) and stand-in MoE and dense checkpoints
    recording dataA's tokenizer."""
    from megatron_btm.data.identity import tokenizer_of
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess
    from megatron_btm.megatron.model import GPTConfig
    root = tmp_path_factory.mktemp("train-moe-errors")
    for name, sources in (("A", {"bible": "bible", "legal": "legal"}),
                          ("B", {"bible": "code_c", "legal": "code_python"})):
        corpus = corpus_slice(corpora, root / f"corpus{name}", sources, 20)
        preprocess(PreprocessConfig(corpus_dir=str(corpus), output_dir=str(root / f"data{name}"),
                                    vocab_size=300, workers=1, progress=False))
    sha = tokenizer_of(root / "dataA")
    for name, model in (("moe", GPTConfig(**PICO, num_moe_experts=4)), ("dense", GPTConfig(**PICO))):
        (root / name).mkdir()
        (root / name / "metadata.json").write_text("{}")
        (root / name / "meta.json").write_text(json.dumps(
            {"model_config": model.to_dict(), "kind": "seed", "tokenizer_sha256": sha}))
    return root


def _train_moe(world, *extra, checkpoint="moe", data="dataA", mode="router-only"):
    return ["train-moe", "--checkpoint", world / checkpoint, "--data", world / data,
            "--domains", "bible,legal", "--mode", mode, "--output", world / "out", *extra]


@pytest.mark.parametrize("kwargs, extra, message", [
    ({"checkpoint": "dense"}, [], "not a mixture-of-experts checkpoint (model_config.num_moe_experts is null"),
    ({"mode": "experts"}, [], "--mode 'experts': valid modes are router-only, full"),
    ({"data": "dataB"}, [], "tokenizer mismatch"),
    ({}, ["--set", "model.hidden_size=64"], "model.hidden_size=32 in the checkpoint but 64"),
    ({}, ["--set", "model.num_moe_experts=2"], "model.num_moe_experts=4 in the checkpoint but 2 in the config"),
    ({}, ["--topk", "5"], "moe_router_topk=5: must be an integer in [1, num_moe_experts=4]"),
    ({}, ["--load-balancing", "sinkhorn"], "load_balancing_type='sinkhorn'"),
    ({}, ["--weights", "1"], "--weights: 1 values for 2 --domains"),
    ({"checkpoint": "missing"}, [], "no checkpoint here"),
])
def test_bad_input_is_one_line_and_writes_nothing(world, capsys, kwargs, extra, message):
    err = btm_err(capsys, *_train_moe(world, *extra, **kwargs))
    assert err.startswith("btm train-moe: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (world / "out").exists()


def test_router_predicate_selects_only_router_tensors():
    from megatron_btm.stages.train_moe import is_router, trainable_of
    assert trainable_of("full") is None and trainable_of("router-only") is is_router
    assert is_router("decoder.layers.0.mlp.router.weight")
    assert is_router("module.decoder.layers.1.mlp.router.expert_bias")
    for name in ("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
                 "decoder.layers.0.pre_mlp_layernorm.weight", "embedding.word_embeddings.weight",
                 "decoder.layers.0.self_attention.router_like.weight"):
        assert not is_router(name), name
