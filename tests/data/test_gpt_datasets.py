"""build_gpt_datasets / read_documents over preprocessed real text, through Megatron-Core."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_btm.data.datasets import build_gpt_datasets, dataset_prefix, read_documents
from megatron_btm.data.tokenizer import load_tokenizer

from data_helpers import read_indexed, read_texts, reference_encode

SEQ = 32
REPO = Path(__file__).resolve().parents[2]


def _runs_without_eod(tokens, eod):
    run = []
    for t in tokens:
        if t == eod:
            if run:
                yield run
            run = []
        else:
            run.append(t)
    if run:
        yield run


def _is_contiguous_in(run, docs):
    """run occurs as a contiguous slice of one of docs (lists of ints)."""
    needle = ",".join(map(str, run)) + ","
    return any(needle in ",".join(map(str, d)) + "," for d in docs)


def test_needs_a_process_group(preprocessed):
    # in a fresh process: this worker may already hold a gloo group (this file's, or another's)
    code = ("import pytest\n"
            "from megatron_btm.data.datasets import build_gpt_datasets\n"
            "from megatron_btm.data.tokenizer import load_tokenizer\n"
            f"p = {str(preprocessed)!r}\n"
            "with pytest.raises(RuntimeError, match='init_process_group'):\n"
            f"    build_gpt_datasets(p, blend={{'bible': 1.0}}, seq_length={SEQ}, num_train_samples=4,\n"
            "                       num_valid_samples=2, seed=0, tokenizer=load_tokenizer(p))\n"
            "print('refused')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]


def test_blend_of_two_domains(preprocessed, gloo_group, tmp_path):
    tok = load_tokenizer(preprocessed)
    train, valid = build_gpt_datasets(preprocessed, blend={"bible": 3.0, "novels": 1.0},
                                      seq_length=SEQ, num_train_samples=40, num_valid_samples=None,
                                      seed=1234, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert len(train) == 40
    docs = {d: read_indexed(dataset_prefix(preprocessed, d, "train")) for d in ("bible", "novels")}
    counts = Counter()
    for i in range(len(train)):
        item = train[i]
        assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (SEQ,)
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])  # labels = next tokens
        assert int(item["tokens"].max()) < tok.vocab_size
        domain = ["bible", "novels"][int(item["dataset_id"])]
        counts[domain] += 1
        window = item["tokens"].tolist() + item["labels"][-1:].tolist()
        for run in _runs_without_eod(window, tok.eod):  # real text of *that* domain
            assert _is_contiguous_in(run, docs[domain]), (i, domain)
    assert abs(counts["bible"] - 30) <= 1 and abs(counts["novels"] - 10) <= 1, counts

    # validation: one GPTDataset per domain, one epoch when num_valid_samples is None
    report = json.loads((preprocessed / "report.json").read_text())
    assert sorted(valid) == ["bible", "novels"]
    for d, ds in valid.items():
        n_tokens = report["domains"][d]["valid"]["tokens"]
        assert len(ds) == (n_tokens - 1) // SEQ
        assert ds[0]["tokens"].shape == (SEQ,)


def test_expert_blend_is_one_domain_and_deterministic(preprocessed, gloo_group, tmp_path):
    tok = load_tokenizer(preprocessed)
    kw = dict(blend={"novels": 1.0}, seq_length=SEQ, num_train_samples=25, num_valid_samples=5,
              tokenizer=tok, valid_domains=["bible", "novels"], cache_dir=tmp_path / "c")
    a, va = build_gpt_datasets(preprocessed, seed=7, **kw)
    b, _ = build_gpt_datasets(preprocessed, seed=7, **kw)
    c, _ = build_gpt_datasets(preprocessed, seed=8, **kw)
    assert len(a) >= 25 and sorted(va) == ["bible", "novels"] and len(va["bible"]) >= 5
    novels = read_indexed(dataset_prefix(preprocessed, "novels", "train"))
    for i in range(5):
        for run in _runs_without_eod(a[i]["tokens"].tolist(), tok.eod):
            assert _is_contiguous_in(run, novels)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(25))
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(25))


def test_errors(preprocessed, gloo_group, tmp_path, corpus_slice):
    tok = load_tokenizer(preprocessed)
    kw = dict(seq_length=SEQ, num_train_samples=4, num_valid_samples=2, seed=0, tokenizer=tok,
              cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"nosuch/train\.bin: not found.*bible, novels"):
        build_gpt_datasets(preprocessed, blend={"nosuch": 1.0}, **kw)
    with pytest.raises(ValueError, match=r"blend\['bible'\]=0"):
        build_gpt_datasets(preprocessed, blend={"bible": 0}, **kw)
    from megatron_btm.data.tokenizer import train_bpe
    other = train_bpe([corpus_slice / "novels" / "valid.jsonl"], 300, tmp_path / "other.json")
    with pytest.raises(ValueError, match="different tokenizer"):
        build_gpt_datasets(preprocessed, blend={"bible": 1.0}, **{**kw, "tokenizer": other})


def test_read_documents_matches_direct_encoding(preprocessed, corpus_slice, tokenizer_path):
    tok = load_tokenizer(preprocessed)
    texts = read_texts(corpus_slice / "bible" / "test.jsonl")
    docs = list(read_documents(preprocessed, "bible", "test", tokenizer=tok))
    assert docs == reference_encode(tokenizer_path, texts)
    assert list(read_documents(preprocessed, "bible", "test", max_docs=3)) == docs[:3]
    assert tok.decode(docs[0][:-1]) == texts[0]
