"""`btm import-hf` / `btm export-hf` of Mixtral (a Megatron-Core MoE model), against transformers."""
import json
import shutil

import pytest
import torch
from hf_helpers import VOCAB, hf_logits, megatron_logits, megatron_model, tokens

from megatron_btm.export import export_checkpoint
from megatron_btm.hf.importer import import_hf

from megatron_btm.megatron.model import GPTConfig

if "num_moe_experts" not in GPTConfig.__dataclass_fields__:  # pragma: no cover
    pytest.skip("MoE model support (GPTConfig.num_moe_experts) is not on this branch yet",
                allow_module_level=True)

TOL = 1e-4
EXPERTS, TOPK = 4, 2


def save_tiny_mixtral(folder, tokenizer_files=None, seed: int = 0):
    """A random 2-layer Mixtral (GQA, 4 experts, top-2) with wide weights, saved to `folder`."""
    import transformers
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
        num_experts_per_tok=TOPK, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    for f in (tokenizer_files.iterdir() if tokenizer_files else ()):
        shutil.copy(f, folder / f.name)
    return model


def _tensors(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_mixtral_import_matches_transformers_and_export_round_trips(gloo_world, tmp_path,
                                                                    hf_tokenizer_files):
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "hf"
    model = save_tiny_mixtral(folder, hf_tokenizer_files)
    original = _tensors(folder)
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in original  # on-disk names
    ckpt = import_hf(folder, tmp_path / "ckpt")
    meta = json.loads((ckpt / "iter_0000000" / "meta.json").read_text())
    mc = meta["model_config"]
    assert (mc["num_moe_experts"], mc["moe_router_topk"], mc["arch"]) == (EXPERTS, TOPK, "llama")
    assert meta["imported_from"]["router"]["moe_router_pre_softmax"] is False

    ids = tokens()
    ref = hf_logits(model, ids)
    assert ref.std(1).mean() > 0.3  # logits depend on the context: the comparison is informative
    megatron, cfg = megatron_model(ckpt)
    assert type(megatron.decoder.layers[0].mlp).__name__ == "MoELayer"
    assert sum(p.numel() for p in megatron.parameters()) == cfg.num_parameters()
    torch.testing.assert_close(megatron_logits(megatron, ids), ref, atol=TOL, rtol=0)

    out = export_checkpoint(ckpt, tokenizer=ckpt, output=tmp_path / "out")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["MixtralForCausalLM"]
    assert (hf_config["num_local_experts"], hf_config["num_experts_per_tok"]) == (EXPERTS, TOPK)
    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(hf_logits(back.float().eval(), ids), ref, atol=TOL, rtol=0)
    exported = _tensors(out)
    assert set(exported) == set(original)
    for key, t in original.items():  # import -> export: the identical tensors
        assert torch.equal(exported[key], t), key


def test_router_is_mixtral_softmax_topk_renormalised():
    """Megatron's default router (top-k of the logits, softmax over the k) gives Mixtral's weights
    (softmax over all experts, top-k, renormalised) — the setting the import records."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    logits = torch.randn(50, EXPERTS, generator=torch.Generator().manual_seed(3))
    probs, routing_map = topk_routing_with_score_function(logits, TOPK, use_pre_softmax=False,
                                                          score_function="softmax")
    top, idx = torch.softmax(logits, -1).topk(TOPK, dim=-1)
    ref = torch.zeros_like(logits).scatter(1, idx, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)
    assert torch.equal(routing_map, ref > 0)


def test_gpt2_style_moe_export_is_refused_in_one_line():
    from megatron_btm.hf import families
    from megatron_btm.megatron.model import GPTConfig
    cfg = GPTConfig(arch="gpt2", num_moe_experts=2, moe_router_topk=1)
    with pytest.raises(ValueError, match="GPT-2-style MoE") as err:
        families.for_config(cfg)
    assert "\n" not in str(err.value) and "INTEROP.md" in str(err.value)
    llama_moe = GPTConfig(arch="llama", num_moe_experts=2, moe_router_topk=1)
    assert families.for_config(llama_moe).architecture == "MixtralForCausalLM"
    with pytest.raises(ValueError, match="num_moe_experts"):  # a dense class cannot hold experts
        families.for_config(llama_moe, "LlamaForCausalLM")
    dense = GPTConfig(arch="llama")
    assert families.for_config(dense).architecture == "LlamaForCausalLM"


def test_top1_eval_override_equals_transformers_mixtral_at_top1(gloo_world, tmp_path):
    """`btm eval --moe`'s top-1 (weight 1 on the argmax expert, as Mixtral's renormalised top-1)
    against transformers' Mixtral with num_experts_per_tok=1 — an independent reference."""
    from megatron_btm.inference.scoring import load_expert
    folder = tmp_path / "hf"
    model = save_tiny_mixtral(folder)
    ckpt = import_hf(folder, tmp_path / "ckpt")
    ids = tokens()
    top2 = hf_logits(model, ids)
    for layer in model.model.layers:  # the same weights, one active expert per token
        layer.mlp.top_k = layer.mlp.gate.top_k = 1
    ref = hf_logits(model, ids)
    assert (ref - top2).abs().max() > 1e-2  # k matters
    expert = load_expert(ckpt, overrides={"moe_router_topk": 1})
    torch.testing.assert_close(expert.logits(ids)[..., :VOCAB].float(), ref, atol=TOL, rtol=0)
