"""`btm import-hf` / `btm export-hf` for every supported family, against transformers itself."""
import json
import shutil

import pytest
import torch
from hf_helpers import FAMILIES, hf_logits, megatron_logits, megatron_model, save_hf_model, tokens

from megatron_btm.export import ExportConfig, export_checkpoint
from megatron_btm.hf.importer import import_hf

TOL = 1e-4
PRESET = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _hf_folder(family, tmp_path, tokenizer_files, **save_kwargs):
    folder = tmp_path / "hf"
    model = save_hf_model(family, folder, **save_kwargs)
    for f in tokenizer_files.iterdir():
        shutil.copy(f, folder / f.name)
    return folder, model


def _tensors(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_transformers_and_export_round_trips(family, gloo_world, tmp_path,
                                                            hf_tokenizer_files):
    from transformers import AutoModelForCausalLM
    folder, model = _hf_folder(family, tmp_path, hf_tokenizer_files)
    ckpt = import_hf(folder, tmp_path / "ckpt")
    assert {"tokenizer.json", "tokenizer_config.json", "latest"} <= {p.name for p in ckpt.iterdir()}
    ids = tokens()
    ref = hf_logits(model, ids)
    assert ref.std(1).mean() > 0.3  # logits depend on the context: the comparison is informative
    megatron, cfg = megatron_model(ckpt)
    assert cfg.arch == PRESET[family] and cfg.padded_vocab_size() == cfg.vocab_size == 1000
    assert sum(p.numel() for p in megatron.parameters()) == cfg.num_parameters()
    torch.testing.assert_close(megatron_logits(megatron, ids), ref, atol=TOL, rtol=0)

    out = export_checkpoint(ckpt, tokenizer=ckpt, output=tmp_path / "out")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == [FAMILIES[family][1]]
    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(hf_logits(back.float().eval(), ids), ref, atol=TOL, rtol=0)
    original, exported = _tensors(folder), _tensors(out)
    assert set(exported) == set(original)
    for key, t in original.items():  # import -> export: the identical tensors
        assert torch.equal(exported[key], t), key
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_sharded_safetensors_and_pytorch_bin_import_the_same_tensors(tmp_path, hf_tokenizer_files):
    from megatron_btm.averaging.torch_dist import TorchDistReader
    single, model = _hf_folder("qwen2", tmp_path, hf_tokenizer_files)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(single / "config.json", binary / "config.json")
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    paths = [import_hf(f, tmp_path / f"ckpt-{f.name}") / "iter_0000000" for f in (single, sharded, binary)]
    readers = [TorchDistReader(p) for p in paths]
    keys = list(readers[0].tensors())  # tied Qwen2: embedding, final norm; 7 per layer
    assert len(keys) == 2 + 7 and all(set(r.tensors()) == set(keys) for r in readers)
    for key in keys:
        ref = readers[0].read_tensor(key)
        for r in readers[1:]:
            assert torch.equal(r.read_tensor(key), ref), key


def test_cli_import_then_export_as_another_class(tmp_path, hf_tokenizer_files, capsys):
    from transformers import LlamaForCausalLM

    from megatron_btm import cli
    folder, model = _hf_folder("llama", tmp_path, hf_tokenizer_files)
    ckpt = tmp_path / "ckpt"
    assert cli.main(["import-hf", str(folder), "--output", str(ckpt), "--tp", "2", "--pp", "2",
                     "--seq-length", "32"]) == 0
    assert "imported LlamaForCausalLM as model.arch=llama" in capsys.readouterr().out
    assert json.loads((ckpt / "iter_0000000" / "meta.json").read_text())["model_config"]["seq_length"] == 32
    # Llama-3 RoPE scaling: MistralForCausalLM cannot express it
    assert cli.main(["export-hf", "--checkpoint", str(ckpt), "--tokenizer", str(ckpt), "--output",
                     str(tmp_path / "m"), "--architecture", "MistralForCausalLM"]) == 2
    err = capsys.readouterr().err
    assert "architecture=MistralForCausalLM: cannot represent model rope_scaling_factor=8.0" in err
    assert cli.main(["export-hf", "--checkpoint", str(ckpt), "--tokenizer", str(ckpt), "--output",
                     str(tmp_path / "g"), "--architecture", "GPT2LMHeadModel"]) == 2
    assert "cannot represent model position_embedding_type='rope'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "g").exists()
    folder2, model2 = _hf_folder("mistral", tmp_path / "x", hf_tokenizer_files)
    ckpt2 = import_hf(folder2, tmp_path / "ckpt2")
    out = export_checkpoint(ckpt2, tokenizer=ckpt2, output=tmp_path / "as-llama",
                            config=ExportConfig(architecture="LlamaForCausalLM"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    as_llama = LlamaForCausalLM.from_pretrained(out).float().eval()  # same math as Mistral here
    torch.testing.assert_close(hf_logits(as_llama, tokens()), hf_logits(model2, tokens()), atol=TOL, rtol=0)


def test_gpt2_checkpoint_of_the_base_model_layout(tmp_path, hf_tokenizer_files):
    """Hub GPT-2 files name tensors without `transformer.` and carry attention-mask buffers."""
    from safetensors.torch import save_file

    from megatron_btm.averaging.torch_dist import TorchDistReader
    folder, model = _hf_folder("gpt2", tmp_path, hf_tokenizer_files)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "config.json", bare / "config.json")
    state = {k.removeprefix("transformer."): v for k, v in _tensors(folder).items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))  # a buffer, not a weight
    save_file(state, str(bare / "model.safetensors"))
    a, b = (TorchDistReader(import_hf(f, tmp_path / f"ck-{f.name}") / "iter_0000000") for f in (folder, bare))
    assert set(a.tensors()) == set(b.tensors())
    for key in a.tensors():
        assert torch.equal(a.read_tensor(key), b.read_tensor(key)), key
