"""Bad input to `btm import-hf`: a one-line error naming the input, and nothing written."""
import json
import subprocess
import sys

import pytest
import torch
from hf_helpers import save_hf_model

from megatron_btm.hf.importer import import_hf


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def _assert_fails(folder, out, exc, match):
    with pytest.raises(exc, match=match) as info:
        import_hf(folder, out)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def llama(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    return tmp_path / "hf"


def test_unsupported_architecture_lists_the_supported(llama, tmp_path):
    _edit_config(llama, architectures=["BertForMaskedLM"])
    _assert_fails(llama, tmp_path / "out", ValueError,
                  r"config.json: architectures=\['BertForMaskedLM'\] \(model_type='llama'\) is not "
                  r"supported; supported: "
                  r"\['GPT2LMHeadModel', 'LlamaForCausalLM', 'MistralForCausalLM', 'MixtralForCausalLM', "
                  r"'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\]")


def test_missing_shard_is_named(tmp_path):
    from hf_helpers import make_hf_model
    folder = tmp_path / "hf"
    make_hf_model("llama").save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    _assert_fails(folder, tmp_path / "out", FileNotFoundError, f"{shard}: shard named by .*index.json is missing")


def test_tensor_shape_disagreeing_with_config(llama, tmp_path):
    _edit_config(llama, intermediate_size=96)
    _assert_fails(llama, tmp_path / "out", ValueError,
                  r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[128, 64\] "
                  r"but .*config.json implies \[96, 64\]")


class NotATensor:
    pass


def test_pickle_with_non_tensor_objects_is_refused(llama, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_bytes((llama / "config.json").read_bytes())
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": NotATensor()},
               folder / "pytorch_model.bin")
    _assert_fails(folder, tmp_path / "out", ValueError,
                  r"pytorch_model.bin: holds objects other than tensors; refusing to unpickle them")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "step": 3}, folder / "pytorch_model.bin")
    _assert_fails(folder, tmp_path / "out", ValueError, r"entry 'step' is a int, not a tensor")


def test_output_folder_that_is_not_empty(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="folder is not empty"):
        import_hf(llama, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_layout_and_unused_weights(llama, tmp_path):
    with pytest.raises(ValueError, match=r"--tp 4: must divide the attention heads \(4\) and key/value heads \(2\)"):
        import_hf(llama, tmp_path / "out", tp=4)
    with pytest.raises(ValueError, match=r"--pp 3: must divide the number of layers \(2\)"):
        import_hf(llama, tmp_path / "out", pp=3)
    with pytest.raises(ValueError, match=r"--seq-length 65: exceeds the 64 positions"):
        import_hf(llama, tmp_path / "out", seq_length=65)
    _edit_config(llama, num_hidden_layers=1)  # layer 1's tensors would be silently dropped
    _assert_fails(llama, tmp_path / "out", ValueError, r"tensor\(s\) \['model.layers.1.")


def test_cli_prints_one_line(llama, tmp_path):
    _edit_config(llama, architectures=["BertForMaskedLM"])
    proc = subprocess.run([sys.executable, "-m", "megatron_btm.cli", "import-hf", str(llama),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("btm import-hf: error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
