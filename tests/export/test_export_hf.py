"""Exported folders load with `transformers` alone and reproduce Megatron's logits."""
import json
from pathlib import Path

import pytest
import torch

from megatron_btm.export import ExportConfig, export_checkpoint

TOL = 1e-4


def _hf_logits(folder, tokens):
    from transformers import GPT2LMHeadModel
    model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def _check_reference_is_informative(logits):
    # trained weights: logits vary over the vocabulary and with the input (position, token)
    assert logits.std(-1).min() > 0.1
    assert logits.std(1).mean() > 0.1


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_logits_match_megatron(trained, tokenizer_path, tmp_path, name):
    from megatron_btm.data.tokenizer import load_tokenizer
    ref = trained[name]
    _check_reference_is_informative(ref["logits"])
    out = export_checkpoint(ref["checkpoint"], tokenizer=tokenizer_path, output=tmp_path / "hf")
    vocab = load_tokenizer(tokenizer_path).vocab_size
    got = _hf_logits(out, ref["tokens"])
    assert got.shape == (3, 16, vocab)  # padding rows sliced off
    torch.testing.assert_close(got, ref["logits"][..., :vocab], atol=TOL, rtol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is (name == "tied")
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is (name == "untied")


@pytest.mark.distributed
@pytest.mark.slow
def test_logits_match_for_checkpoint_saved_at_tp2(trained_tp2, tokenizer_path, tmp_path):
    ref = trained_tp2["tp2"]
    _check_reference_is_informative(ref["logits"])
    meta = json.loads((Path(ref["checkpoint"]) / "meta.json").read_text())
    assert meta["parallel"]["tp"] == 2  # saved as two TP shards
    out = export_checkpoint(ref["checkpoint"], tokenizer=tokenizer_path, output=tmp_path / "hf")
    got = _hf_logits(out, ref["tokens"])
    torch.testing.assert_close(got, ref["logits"][..., :got.shape[-1]], atol=TOL, rtol=0)


def test_keep_padded_vocab_reproduces_every_logit(trained, tokenizer_path, tmp_path):
    ref = trained["untied"]
    out = export_checkpoint(ref["checkpoint"], tokenizer=tokenizer_path, output=tmp_path / "hf",
                            config=ExportConfig(keep_padded_vocab=True))
    got = _hf_logits(out, ref["tokens"])
    assert got.shape == ref["logits"].shape == (3, 16, 384)
    torch.testing.assert_close(got, ref["logits"], atol=TOL, rtol=0)


def test_averaged_model_export(trained, tokenizer_path, tmp_path):
    """An averaged (weights-only) checkpoint exports like any other; reference: the average of
    the two experts' exported HF weights, taken here, loaded into transformers."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from megatron_btm.averaging.apply import average_checkpoints
    a, b = trained["tied"]["checkpoint"], trained["tied_b"]["checkpoint"]
    average_checkpoints([a, b], [0.25, 0.75], tmp_path / "avg")
    out = export_checkpoint(tmp_path / "avg", tokenizer=tokenizer_path, output=tmp_path / "hf")
    sd_a = load_file(export_checkpoint(a, tokenizer=tokenizer_path, output=tmp_path / "a") /
                     "model.safetensors")
    sd_b = load_file(export_checkpoint(b, tokenizer=tokenizer_path, output=tmp_path / "b") /
                     "model.safetensors")
    ref_model = GPT2LMHeadModel.from_pretrained(tmp_path / "a").eval()
    res = ref_model.load_state_dict({k: 0.25 * sd_a[k] + 0.75 * sd_b[k] for k in sd_a}, strict=False)
    assert not res.unexpected_keys and set(res.missing_keys) <= {"lm_head.weight"}  # tied to wte
    tokens = trained["tied"]["tokens"]
    with torch.no_grad():
        ref = ref_model(tokens).logits
    got = _hf_logits(out, tokens)
    assert (ref - _hf_logits(tmp_path / "a", tokens)).abs().max() > 0.1  # averaging mattered
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    readme = (out / "README.md").read_text()
    assert "## Parameter average" in readme and '"weights": [\n    0.25,\n    0.75' in readme


def test_bf16_export(trained, tokenizer_path, tmp_path):
    ref = trained["tied"]
    out = export_checkpoint(ref["checkpoint"], tokenizer=tokenizer_path, output=tmp_path / "hf",
                            config=ExportConfig(dtype="bf16"))
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(ref["tokens"]).logits
    vocab = got.shape[-1]
    err = (got - ref["logits"][..., :vocab]).abs().max().item()
    assert 0 < err < 0.1  # bf16 rounding of the weights: close, not exact


def test_tokenizer_round_trips_with_autotokenizer(trained, tokenizer_path, tmp_path):
    from transformers import AutoTokenizer

    from megatron_btm.data.tokenizer import load_tokenizer
    out = export_checkpoint(trained["tied"]["checkpoint"], tokenizer=tokenizer_path,
                            output=tmp_path / "hf")
    ours = load_tokenizer(tokenizer_path)
    hf = AutoTokenizer.from_pretrained(out)
    text = "The Court held, in 1998, that the statute — “as amended” — did not apply. Ünïcødé ✓\n\tx"
    ids = hf(text)["input_ids"]
    assert ids == ours.encode(text)
    assert hf.decode(ids) == text
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == ours.eod
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eod


def test_output_is_complete_and_described(trained, tokenizer_path, tmp_path):
    ref = trained["tied"]
    out = export_checkpoint(ref["checkpoint"], tokenizer=tokenizer_path, output=tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md", "btm_export.json"} <= names
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    info = json.loads((out / "btm_export.json").read_text())
    assert info["source_meta"]["step"] == 4
    assert info["hf_vocab_size"] == info["tokenizer_vocab_size"] < info["padded_vocab_size"] == 384
    readme = (out / "README.md").read_text()
    assert "padding rows removed" in readme and "iter_0000004" in readme


def test_failed_export_leaves_nothing(trained, tokenizer_path, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(trained["tied"]["checkpoint"], tokenizer=tokenizer_path,
                          output=tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder
