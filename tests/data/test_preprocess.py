"""preprocess(): real corpus slices → .bin/.idx read back through Megatron's IndexedDataset."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_btm.data.preprocess import PreprocessConfig, preprocess
from megatron_btm.utils.io import cleanup_stale_tmp, sha256_file

from data_helpers import SLICE, read_indexed, read_texts, reference_encode

REPO = Path(__file__).resolve().parents[2]


def test_tokens_equal_direct_encoding(preprocessed, corpus_slice, tokenizer_path):
    report = json.loads((preprocessed / "report.json").read_text())
    assert (preprocessed / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    for domain, splits in SLICE.items():
        for split in splits:
            texts = read_texts(corpus_slice / domain / f"{split}.jsonl")
            expected = reference_encode(tokenizer_path, texts)
            got = read_indexed(preprocessed / domain / split)
            assert got == expected, f"{domain}/{split}"
            entry = report["domains"][domain][split]
            assert entry["documents"] == len(texts) == entry["sequences"]
            assert entry["tokens"] == sum(map(len, expected))
            assert entry["skipped_lines"] == 0
    assert report["totals"]["documents"] == sum(
        len(read_texts(corpus_slice / d / f"{s}.jsonl")) for d in SLICE for s in SLICE[d])


def test_one_worker_and_two_workers_write_identical_files(preprocessed, corpus_slice,
                                                          tokenizer_path, tmp_path):
    out = tmp_path / "w1"
    preprocess(PreprocessConfig(corpus_dir=str(corpus_slice), output_dir=str(out),
                                tokenizer=str(tokenizer_path), workers=1, progress=False))
    for d in SLICE:
        for s in SLICE[d]:
            for ext in (".bin", ".idx"):
                assert sha256_file(out / d / (s + ext)) == sha256_file(preprocessed / d / (s + ext))
    # uint16 tokens: a 1024-token vocabulary needs 2 bytes per token
    report = json.loads((out / "report.json").read_text())
    assert (out / "bible" / "train.bin").stat().st_size == 2 * report["domains"]["bible"]["train"]["tokens"]


def test_trains_tokenizer_when_none_given_and_max_docs(corpus_slice, tmp_path):
    out = tmp_path / "out"
    report = preprocess(PreprocessConfig(corpus_dir=str(corpus_slice), output_dir=str(out),
                                         domains=["novels"], splits=("train", "valid"),
                                         vocab_size=600, max_docs=5, workers=1, progress=False))
    assert report.tokenizer["trained"] and report.tokenizer["vocab_size"] <= 600
    assert sorted(p.name for p in out.iterdir()) == ["novels", "report.json", "tokenizer.json"]
    texts = read_texts(corpus_slice / "novels" / "train.jsonl")[:5]
    assert read_indexed(out / "novels" / "train") == reference_encode(out / "tokenizer.json", texts)
    assert report.splits["novels"]["valid"].documents == 5


def test_sentence_split_sequences_cover_each_document(corpus_slice, tokenizer_path, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    out = tmp_path / "sent"
    report = preprocess(PreprocessConfig(corpus_dir=str(corpus_slice), output_dir=str(out),
                                         domains=["novels"], splits=("valid",), workers=2,
                                         tokenizer=str(tokenizer_path), sentence_split=True,
                                         sentence_train_bytes=200_000, progress=False))
    assert report.sentence_splitter in ("punkt-trained", "punkt-pretrained")
    ds = IndexedDataset(str(out / "novels" / "valid"))
    texts = read_texts(corpus_slice / "novels" / "valid.jsonl")
    assert len(ds.document_indices) - 1 == len(texts)
    assert len(ds.sequence_lengths) > 5 * len(texts)  # novels: many sentences per document
    docs = read_indexed(out / "novels" / "valid")
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(tokenizer_path))
    for text, doc, lo, hi in zip(texts, docs, ds.document_indices[:-1], ds.document_indices[1:]):
        # each stored sentence decodes to a piece of the text; pieces concatenate to the text
        pieces = [hf.decode([int(t) for t in ds[j]], skip_special_tokens=False)
                  for j in range(lo, hi)]
        assert "".join(pieces) == text + "<|endoftext|>"
        assert doc[-1] == hf.token_to_id("<|endoftext|>")


def test_existing_output_needs_overwrite(preprocessed, corpus_slice, tokenizer_path):
    cfg = dict(corpus_dir=str(corpus_slice), output_dir=str(preprocessed), domains=["bible"],
               splits=("test",), tokenizer=str(tokenizer_path), progress=False, workers=1)
    with pytest.raises(FileExistsError, match=str(preprocessed)):
        preprocess(PreprocessConfig(**cfg))


@pytest.mark.parametrize("key,value,rule", [
    ("vocab_size", 100, "257"), ("workers", 0, ">= 1"), ("splits", (), "at least one"),
    ("splits", ("train", "train"), "duplicates"), ("domains", [], "at least one"),
    ("max_docs", 0, ">= 1"), ("sentence_splitter", "spacy", "auto, punkt-pretrained"),
    ("splits", ("../x",), "not a valid split")])
def test_config_validation_names_key_and_value(key, value, rule, tmp_path):
    kwargs = dict(corpus_dir=str(tmp_path / "c"), output_dir=str(tmp_path / "o"))
    kwargs[key] = value
    with pytest.raises(ValueError, match=key) as e:
        PreprocessConfig(**kwargs)
    assert rule in str(e.value)


def test_config_is_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        PreprocessConfig(str(tmp_path), str(tmp_path / "o"))


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import megatron_btm.data.preprocess as pp
    real = pp._encode_split
    def encode_then_die(cfg, path, prefix, *a, **k):
        real(cfg, path, prefix, *a, **k)
        if prefix.name == "valid":  # train and valid of the first domain are complete on disk
            os.kill(os.getpid(), signal.SIGKILL)
    pp._encode_split = encode_then_die
    pp.preprocess(pp.PreprocessConfig(corpus_dir=sys.argv[1], output_dir=sys.argv[2],
                  tokenizer=sys.argv[3], workers=1, progress=False))
""")


def test_killed_run_leaves_nothing_that_looks_complete(corpus_slice, tokenizer_path, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(corpus_slice), str(out),
                           str(tokenizer_path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p != out]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-killed")
    assert (leftovers[0] / "bible" / "train.bin").is_file()  # the kill happened mid-way
    assert not (leftovers[0] / "report.json").exists()
    assert cleanup_stale_tmp(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_output_is_readable_per_umask(preprocessed):
    umask = os.umask(0)
    os.umask(umask)
    assert (preprocessed.stat().st_mode & 0o777) == 0o777 & ~umask
    for name in ("report.json", "tokenizer.json", "bible/train.idx"):
        assert ((preprocessed / name).stat().st_mode & 0o777) == 0o666 & ~umask, name
