"""Tokenizer: train/load round trips, the GPT-2 files path against GPT-2's own BPE algorithm."""
import json
import pickle
from functools import lru_cache

import pytest

from megatron_btm.data.tokenizer import EOD_TOKEN, load_tokenizer, train_bpe

from data_helpers import read_texts

SAMPLES = ["In the beginning God created the heavens and the earth.\n",
           "  tabs\tand\nnewlines\r\n, unicode: café, naïve, 日本語, emoji 😀 ",
           f"literal {EOD_TOKEN} inside a document is text, not the end of it",
           ""]


def test_trained_bpe_round_trips_and_saves(corpus_slice, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert 257 <= tok.vocab_size <= 1024
    assert tok._hf.id_to_token(tok.eod) == EOD_TOKEN
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.eod not in ids  # the literal marker is encoded as ordinary bytes
    # the same tokenizer through a folder, and through pickling (pool workers get it that way)
    by_folder = load_tokenizer(tokenizer_path.parent)
    clone = pickle.loads(pickle.dumps(tok))
    text = read_texts(corpus_slice / "bible" / "valid.jsonl")[0]
    assert by_folder.encode(text) == tok.encode(text) == clone.encode(text)
    assert by_folder.sha256 == tok.sha256


def test_trained_bpe_compresses_held_out_text(corpus_slice, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    text = "".join(read_texts(corpus_slice / "bible" / "valid.jsonl"))
    n_bytes, n_tokens = len(text.encode("utf-8")), len(tok.encode(text))
    assert n_tokens < n_bytes / 2.5, (n_tokens, n_bytes)  # merges learned, not just bytes


def test_train_bpe_validates_arguments(tmp_path, corpus_slice):
    files = [corpus_slice / "bible" / "train.jsonl"]
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(files, 100, tmp_path / "t.json")
    with pytest.raises(ValueError, match="jsonl_paths"):
        train_bpe([], 1000, tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train_bpe([tmp_path / "nope.jsonl"], 1000, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_train_bpe_respects_max_bytes(tmp_path):
    # Words that only occur after the byte cap must not be learned as merges.
    f = tmp_path / "c.jsonl"
    lines = [{"text": "alpha beta gamma " * 50}] * 4 + [{"text": "zyxwv " * 500}] * 4
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    capped = train_bpe([f], 400, tmp_path / "a.json", max_bytes=3000)
    full = train_bpe([f], 400, tmp_path / "b.json")
    assert len(capped.encode(" zyxwv")) > 1
    assert len(full.encode(" zyxwv")) == 1


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.json")):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_tokenizer(tmp_path)  # a folder with neither tokenizer.json nor GPT-2 files
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        load_tokenizer(bad)


# --- GPT-2 files (encoder.json + vocab.bpe), checked against GPT-2's reference algorithm -------

def bytes_to_unicode():
    """openai/gpt-2 src/encoder.py: reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"),
          ("i", "n"), ("Ġ", "in"), ("o", "n"), ("Ġ", "a"), ("Ġa", "n"), ("Ġan", "d")]


def reference_gpt2_encode(text, encoder, merges):
    """GPT-2's encoder.py BPE (lowest-rank pair first), independent of HF tokenizers."""
    import regex
    b2u = bytes_to_unicode()
    ranks = {m: i for i, m in enumerate(merges)}

    @lru_cache(None)
    def bpe(token):
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    ids = []
    for tok in regex.findall(GPT2_PAT, text):
        ids.extend(encoder[p] for p in bpe("".join(b2u[b] for b in tok.encode("utf-8"))))
    return ids


@pytest.fixture
def gpt2_dir(tmp_path):
    encoder = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for a, b in MERGES:
        encoder[a + b] = len(encoder)
    encoder[EOD_TOKEN] = len(encoder)
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return tmp_path, encoder


def test_gpt2_files_match_reference_bpe(gpt2_dir):
    folder, encoder = gpt2_dir
    tok = load_tokenizer(folder)
    assert tok.vocab_size == len(encoder)
    assert tok.eod == encoder[EOD_TOKEN]
    for text in ["the cat and the hat in the hut", " then, 42 cats... and\n\n the end",
                 "The Cat's hat isn't there", "unicode café ☕"]:
        ids = tok.encode(text)
        assert ids == reference_gpt2_encode(text, encoder, MERGES), text
        assert tok.decode(ids) == text
    assert tok.encode(" the") == [encoder["Ġthe"]]


def test_gpt2_folder_without_eod_is_refused(gpt2_dir):
    folder, encoder = gpt2_dir
    del encoder[EOD_TOKEN]
    (folder / "encoder.json").write_text(json.dumps(encoder))
    with pytest.raises(ValueError, match="encoder.json"):
        load_tokenizer(folder)
