"""The Megatron → GPT-2 mapping as pure functions, against layouts built independently here."""
import pytest
import torch

from megatron_btm.export import gpt2


def _megatron_fused(q_HD, k_GD, v_GD, num_heads, groups, head_dim):
    """Megatron's fused QKV rows, built the way attention.py reads them back: for each query
    group g, its np/ng query heads, then k_g, then v_g (rows of head_dim each)."""
    per = num_heads // groups
    rows = []
    for g in range(groups):
        for j in range(per):
            h = g * per + j
            rows.append(q_HD[h * head_dim:(h + 1) * head_dim])
        rows.append(k_GD[g * head_dim:(g + 1) * head_dim])
        rows.append(v_GD[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows, 0)


@pytest.mark.parametrize("num_heads,groups", [(4, 4), (1, 1), (8, 2), (6, 1)])
@pytest.mark.parametrize("trailing", [(), (5,)])  # bias [rows], weight [rows, hidden]
def test_split_fused_qkv_recovers_q_k_v(num_heads, groups, trailing):
    head_dim = 3
    g = torch.Generator().manual_seed(num_heads * 10 + groups)
    q = torch.randn(num_heads * head_dim, *trailing, generator=g)
    k = torch.randn(groups * head_dim, *trailing, generator=g)
    v = torch.randn(groups * head_dim, *trailing, generator=g)
    fused = _megatron_fused(q, k, v, num_heads, groups, head_dim)
    out = gpt2.split_fused_qkv(fused, num_heads, groups)
    assert torch.equal(out, torch.cat([q, k, v], 0))


def test_split_fused_qkv_matches_megatron_attention_split():
    """Megatron's own reshape + split (copied from get_query_key_value_tensors' math) of the
    fused projection output gives the same per-head q/k/v as x @ [q|k|v] after our split."""
    heads, hd, hidden = 4, 2, 8
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * heads * hd, hidden, generator=g)
    x = torch.randn(5, hidden, generator=g)
    mixed = (x @ w.T).view(5, heads, 3 * hd)  # [s, ng, (np/ng + 2)·hn] with ng = np
    q_m, k_m, v_m = torch.split(mixed, [hd, hd, hd], dim=-1)
    split = gpt2.split_fused_qkv(w, heads, heads)
    q_h, k_h, v_h = (x @ split.T).split(heads * hd, dim=-1)  # HF: [q | k | v], heads contiguous
    assert torch.equal(q_h.view(5, heads, hd), q_m)
    assert torch.equal(k_h.view(5, heads, hd), k_m)
    assert torch.equal(v_h.view(5, heads, hd), v_m)


def _fake_state(layers=2, hidden=8, heads=2, vocab=16, seq=4, ffn=32, tied=True, fused_ln=True):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ln_in = "self_attention.linear_qkv.layer_norm_" if fused_ln else "input_layernorm."
    ln_mlp = "mlp.linear_fc1.layer_norm_" if fused_ln else "pre_mlp_layernorm."
    L = "decoder.layers."
    st = {"embedding.word_embeddings.weight": r(vocab, hidden),
          "embedding.position_embeddings.weight": r(seq, hidden),
          "decoder.final_layernorm.weight": r(hidden), "decoder.final_layernorm.bias": r(hidden),
          L + ln_in + "weight": r(layers, hidden), L + ln_in + "bias": r(layers, hidden),
          L + ln_mlp + "weight": r(layers, hidden), L + ln_mlp + "bias": r(layers, hidden),
          L + "self_attention.linear_qkv.weight": r(layers, 3 * hidden, hidden),
          L + "self_attention.linear_qkv.bias": r(layers, 3 * hidden),
          L + "self_attention.linear_proj.weight": r(layers, hidden, hidden),
          L + "self_attention.linear_proj.bias": r(layers, hidden),
          L + "mlp.linear_fc1.weight": r(layers, ffn, hidden), L + "mlp.linear_fc1.bias": r(layers, ffn),
          L + "mlp.linear_fc2.weight": r(layers, hidden, ffn), L + "mlp.linear_fc2.bias": r(layers, hidden)}
    if not tied:
        st["output_layer.weight"] = r(vocab, hidden)
    return st


@pytest.mark.parametrize("fused_ln", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_mapping_shapes_transposes_and_vocab_slice(fused_ln, tied):
    st = _fake_state(tied=tied, fused_ln=fused_ln)
    keys = gpt2.required_keys(st, tie_embeddings=tied)
    assert set(keys) == set(st)  # reads exactly what a checkpoint of this layout holds
    out = gpt2.megatron_to_gpt2(st, num_layers=2, num_heads=2, vocab_size=10, tie_embeddings=tied,
                                dtype=torch.bfloat16)
    assert out["transformer.wte.weight"].shape == (10, 8)
    assert torch.equal(out["transformer.wte.weight"].float(),
                       st["embedding.word_embeddings.weight"][:10].bfloat16().float())
    assert ("lm_head.weight" in out) == (not tied)
    fc1 = st["decoder.layers.mlp.linear_fc1.weight"][1]
    assert torch.equal(out["transformer.h.1.mlp.c_fc.weight"], fc1.T.bfloat16())  # Conv1D [in, out]
    ln = "self_attention.linear_qkv.layer_norm_weight" if fused_ln else "input_layernorm.weight"
    assert torch.equal(out["transformer.h.0.ln_1.weight"], st["decoder.layers." + ln][0].bfloat16())
    assert out["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in out.values())
    # GPT2LMHeadModel has 12 parameters per layer (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj; w+b)
    assert sum(k.startswith("transformer.h.0.") for k in out) == 12


def test_missing_and_misshapen_tensors_are_named():
    st = _fake_state()
    del st["decoder.layers.mlp.linear_fc1.layer_norm_weight"]
    with pytest.raises(ValueError, match=r"pre_mlp_layernorm\.weight.*ln_2\.weight"):
        gpt2.required_keys(st, tie_embeddings=True)
    with pytest.raises(ValueError, match="leading .layer. axis is 2, expected num_layers=3"):
        gpt2.megatron_to_gpt2(_fake_state(), num_layers=3, num_heads=2, vocab_size=16,
                              tie_embeddings=True)
    with pytest.raises(ValueError, match="vocab_size=17 exceeds"):
        gpt2.megatron_to_gpt2(_fake_state(), num_layers=2, num_heads=2, vocab_size=17,
                              tie_embeddings=True)


def test_config_is_exact_gelu_gpt2():
    kw = gpt2.gpt2_config_kwargs({"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4,
                                  "seq_length": 32, "ffn_hidden_size": None, "tie_embeddings": False},
                                 vocab_size=300, eos_token_id=5, dtype_name="float32")
    assert kw["activation_function"] == "gelu" and kw["layer_norm_epsilon"] == 1e-5
    assert (kw["n_inner"], kw["n_positions"], kw["vocab_size"]) == (256, 32, 300)
    assert kw["tie_word_embeddings"] is False and kw["eos_token_id"] == 5
