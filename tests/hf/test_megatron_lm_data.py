"""A dataset made by Megatron-LM's tools/preprocess_data.py (`<prefix>_text_document.bin/.idx`,
written by Megatron-Core's IndexedDatasetBuilder exactly as that script does, --append-eod) is a
domain's data when linked as `<data>/<domain>/<split>.bin/.idx` beside the tokenizer.json it was
encoded with (docs/INTEROP.md): no re-tokenizing."""
import json

from hf_helpers import llama_style_tokenizer

TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 3} times" for i in range(40)]


def _preprocess_data_py(fast, texts, prefix):
    """What tools/preprocess_data.py --append-eod writes for these texts (one document each)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f"{prefix}_text_document.bin", dtype=DType.optimal_dtype(len(fast)))
    docs = []
    for text in texts:
        ids = fast(text, add_special_tokens=False).input_ids + [fast.eos_token_id]
        builder.add_document(ids, [len(ids)])
        docs.append(ids)
    builder.finalize(f"{prefix}_text_document.idx")
    return docs


def test_megatron_lm_dataset_linked_as_a_domain(tmp_path, gloo_world):
    from megatron_btm.data.datasets import build_gpt_datasets, read_documents
    from megatron_btm.data.tokenizer import load_tokenizer
    fast = llama_style_tokenizer(TEXTS, 300)
    fast.save_pretrained(tmp_path / "tok")
    mlm = tmp_path / "megatron-data"
    mlm.mkdir()
    docs = {s: _preprocess_data_py(fast, TEXTS[i::2], mlm / f"web-{s}") for i, s in enumerate(("train", "valid"))}

    data = tmp_path / "data"
    (data / "web").mkdir(parents=True)
    tok = load_tokenizer(tmp_path / "tok")
    tok.save(data / "tokenizer.json")  # + tokenizer_config.json naming </s>, the eod used above
    for split in docs:
        for ext in ("bin", "idx"):
            (data / "web" / f"{split}.{ext}").symlink_to(mlm / f"web-{split}_text_document.{ext}")
    assert tok.eod == fast.eos_token_id
    assert list(read_documents(data, "web", "valid", tokenizer=tok)) == docs["valid"]
    train, valid = build_gpt_datasets(data, blend={"web": 1.0}, seq_length=16, num_train_samples=8,
                                      num_valid_samples=None, seed=0, tokenizer=tok,
                                      cache_dir=tmp_path / "cache")
    flat = {t for d in docs["train"] for t in d}
    sample = train[0]["tokens"].tolist()
    assert len(sample) == 16 and set(sample) <= flat and len(valid["web"]) >= 1
    assert json.loads((data / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
