"""Import reads config.json without transformers (`Family.hf_config`: the file over the config
class's defaults) and reads rows straight into Megatron's layout (`mapping.row_moves`): both
checked here against transformers' config classes and `to_megatron`."""
import json
import subprocess
import sys

import pytest
import torch
from hf_helpers import FAMILIES as TINY
from hf_helpers import save_hf_model

from megatron_btm.hf.families import FAMILIES
from megatron_btm.hf.mapping import row_moves, to_megatron

MODEL_TYPES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral"}


def _configs():
    """(architecture, config.json dict): the tiny test models' files as saved by transformers,
    the bare minimum (every field defaulted), and hand-written files with legacy or aliased keys."""
    import transformers
    out = []
    for config_cls, model_cls, kwargs in TINY.values():
        saved = getattr(transformers, config_cls)(**kwargs).to_dict()
        out.append((model_cls, dict(saved, architectures=[model_cls])))
    out += [(arch, {"architectures": [arch], "model_type": t}) for arch, t in MODEL_TYPES.items()]
    out += [("LlamaForCausalLM", {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                  "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500000.0,
                                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192}}),
            ("GPT2LMHeadModel", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                 "hidden_size": 96, "num_attention_heads": 6, "n_layer": 3}),
            ("MistralForCausalLM", {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                    "hidden_size": 64, "num_attention_heads": 4, "sliding_window": 32}),
            ("Qwen2ForCausalLM", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                  "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "use_sliding_window": True, "sliding_window": 16}),
            ("Qwen3ForCausalLM", {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                  "hidden_size": 64, "num_attention_heads": 4}),  # head_dim 128
            ("MixtralForCausalLM", {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                                    "num_experts": 4, "num_experts_per_tok": 1})]
    return out


def test_config_fields_equal_those_from_transformers_config_classes(tmp_path):
    from transformers import AutoConfig
    for i, (arch, raw) in enumerate(_configs()):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(raw))
        family = FAMILIES[arch]
        ours = family.from_hf(family.hf_config(raw), "config.json")
        theirs = family.from_hf(AutoConfig.from_pretrained(folder), "config.json")
        assert ours == theirs, (arch, raw)


def test_import_loads_neither_transformers_nor_megatron_core(tmp_path):
    save_hf_model("llama", tmp_path / "hf")
    code = ("import sys; from megatron_btm.hf.importer import import_hf; "
            "import_hf(sys.argv[1], sys.argv[2]); "
            "print(sorted(m for m in ('transformers', 'megatron.core') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "latest").is_file()


class _Cfg:
    def __init__(self, heads, groups):
        self.num_attention_heads, self.query_groups = heads, groups


@pytest.mark.parametrize("heads,groups,d", [(4, 4, 3), (4, 2, 5), (8, 1, 2), (6, 3, 4)])
@pytest.mark.parametrize("kind", ["copy", "glu", "qkv"])
def test_row_moves_build_what_to_megatron_builds(kind, heads, groups, d):
    g = torch.Generator().manual_seed(heads * 10 + groups)
    cfg = _Cfg(heads, groups)
    for tail in ((7,), ()):  # weights [rows, hidden] and biases [rows]
        rows = {"copy": [heads * d], "glu": [heads * d, heads * d],
                "qkv": [heads * d, groups * d, groups * d]}[kind]
        hf = [torch.randn(r, *tail, generator=g) for r in rows]
        want = to_megatron(kind, hf, cfg, padded_vocab=0)
        got = torch.full((sum(rows), *tail), float("nan"))
        for i, first, end, at in row_moves(kind, rows, cfg):
            got[at:at + end - first] = hf[i][first:end]
        assert torch.equal(got, want)
    assert row_moves("transpose", [4], cfg) is None and row_moves("vocab", [4], cfg) is None
