"""A Hugging Face tokenizer without `<|endoftext|>` (Llama-style `<s>`/`</s>`): its eos ends the
documents, recorded in the report; a tokenizer that does not fit the named model is refused."""
import json

import pytest
from hf_helpers import llama_style_tokenizer

from megatron_btm.data.preprocess import PreprocessConfig, preprocess
from megatron_btm.data.tokenizer import EOD_TOKEN, load_tokenizer

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]


@pytest.fixture()
def llama_tok_dir(tmp_path):
    fast = llama_style_tokenizer(TEXTS, 300)
    fast.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok", fast


def test_eos_of_the_folder_ends_documents_and_survives_save_and_pickle(llama_tok_dir, tmp_path):
    import pickle
    folder, fast = llama_tok_dir
    tok = load_tokenizer(folder)
    assert tok._hf.token_to_id(EOD_TOKEN) is None
    assert (tok.eod, tok.eod_token) == (fast.eos_token_id, "</s>")
    assert tok.eod_source == "tokenizer_config.json eos_token"
    assert tok.encode(TEXTS[3]) == fast(TEXTS[3], add_special_tokens=False).input_ids
    assert tok.eod not in tok.encode("a literal </s> in the text")
    (tmp_path / "copy").mkdir()
    tok.save(tmp_path / "copy" / "tokenizer.json")
    again = load_tokenizer(tmp_path / "copy" / "tokenizer.json")
    assert (again.eod, again.sha256) == (tok.eod, tok.sha256)
    # the source's tokenizer_config.json (bos, ...) travels with it: HF loads the copy the same
    assert (tmp_path / "copy" / "tokenizer_config.json").read_text() == \
        (folder / "tokenizer_config.json").read_text()
    clone = pickle.loads(pickle.dumps(tok))
    assert (clone.eod, clone.eod_source) == (tok.eod, tok.eod_source)


def test_eos_from_config_json_and_none_at_all(llama_tok_dir, tmp_path):
    folder, fast = llama_tok_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="no '<|endoftext|>' token and no eos token"):
        load_tokenizer(bare)
    (bare / "config.json").write_text(json.dumps({"eos_token_id": [fast.eos_token_id, 0]}))
    tok = load_tokenizer(bare / "tokenizer.json")
    assert (tok.eod, tok.eod_source) == (fast.eos_token_id, "config.json eos_token_id")


def test_preprocess_with_a_model_folder_checks_its_vocabulary(llama_tok_dir, tmp_path):
    from megatron_btm.data.datasets import read_documents
    folder, fast = llama_tok_dir
    corpus = tmp_path / "corpus" / "dom"
    corpus.mkdir(parents=True)
    (corpus / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5]))
    (folder / "config.json").write_text(json.dumps({"vocab_size": len(fast) - 1}))
    cfg = dict(corpus_dir=str(tmp_path / "corpus"), splits=("train",), tokenizer=str(folder),
               workers=1, progress=False)
    with pytest.raises(ValueError, match=r"has 300 ids but the model's vocab_size is 299"):
        preprocess(PreprocessConfig(output_dir=str(tmp_path / "bad"), **cfg))
    assert not (tmp_path / "bad").exists()
    (folder / "config.json").write_text(json.dumps({"vocab_size": 320}))
    report = preprocess(PreprocessConfig(output_dir=str(tmp_path / "data"), **cfg)).to_dict()
    assert report["tokenizer"]["eod_token"] == "</s>" and report["tokenizer"]["model_vocab_size"] == 320
    docs = list(read_documents(tmp_path / "data", "dom", "train"))
    assert docs[1] == fast(TEXTS[1], add_special_tokens=False).input_ids + [fast.eos_token_id]
    assert load_tokenizer(tmp_path / "data" / "tokenizer.json").eod == fast.eos_token_id
