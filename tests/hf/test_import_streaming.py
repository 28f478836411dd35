"""Large embedding / output tables are imported in row slices (never whole in memory): the same
tensors, padding rows included, as a whole-tensor import, and the model loads from them."""
import torch
from hf_helpers import FAMILIES, hf_logits, megatron_logits, megatron_model, tokens

from megatron_btm.averaging.torch_dist import TorchDistReader
from megatron_btm.hf import importer


def test_sliced_tables_equal_whole_ones(tmp_path, monkeypatch, gloo_world):
    import transformers
    config = transformers.LlamaConfig(**{**FAMILIES["llama"][2], "vocab_size": 1001})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(tmp_path / "hf")
    whole = importer.import_hf(tmp_path / "hf", tmp_path / "whole", tp=2)  # padded to 1024 rows
    monkeypatch.setattr(importer, "STREAM_BYTES", 3000)  # ~11 rows of 64 fp32 per slice
    sliced = importer.import_hf(tmp_path / "hf", tmp_path / "sliced", tp=2)
    a, b = TorchDistReader(whole / "iter_0000000"), TorchDistReader(sliced / "iter_0000000")
    emb = "embedding.word_embeddings.weight"
    assert len(b.tensors()[emb].chunks) > 50 and len(a.tensors()[emb].chunks) == 1
    assert tuple(b.tensors()[emb].size) == (1024, 64)
    for key in a.tensors():
        assert torch.equal(a.read_tensor(key), b.read_tensor(key)), key
    megatron, _ = megatron_model(sliced)
    ids = tokens()
    torch.testing.assert_close(megatron_logits(megatron, ids)[..., :1001], hf_logits(model, ids),
                               atol=1e-4, rtol=0)
