"""The demo's default corpus, harvested from this installation: >= 4 domains, disjoint splits."""
import json

import pytest

from megatron_btm.data import embedded
from megatron_btm.data.embedded import MAX_DOC_BYTES, harvest_default_corpus, split_document


def _docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "corpus"
    return out, harvest_default_corpus(str(out), max_bytes_per_domain=150_000, seed=0)


def test_at_least_four_domains_with_disjoint_splits(harvested):
    out, domains = harvested
    assert len(domains) >= 4 and len(set(domains)) == len(domains)
    manifest = json.loads((out / "harvest.json").read_text())
    assert sorted(manifest["domains"]) == sorted(domains)
    all_docs = {}
    for d in domains:
        splits = {s: _docs(out / d / f"{s}.jsonl") for s in ("train", "valid", "test")}
        for s, docs in splits.items():
            assert docs, f"{d}/{s} is empty"
            assert all(0 < len(t.encode("utf-8")) <= MAX_DOC_BYTES for t in docs)
            assert manifest["domains"][d][s]["documents"] == len(docs)
        assert len(splits["train"]) > len(splits["valid"])
        sets = {s: set(docs) for s, docs in splits.items()}
        assert not sets["train"] & sets["valid"] and not sets["train"] & sets["test"]
        assert not sets["valid"] & sets["test"]
        all_docs[d] = set().union(*sets.values())
    total = sum(len(v) for v in all_docs.values())
    assert len(set().union(*all_docs.values())) == total  # no document in two domains either


def test_domains_are_what_they_claim(harvested):
    out, domains = harvested
    text = {d: "".join(_docs(out / d / "train.jsonl")) for d in domains}
    if "python_stdlib" in text:
        assert text["python_stdlib"].count("def ") > 20 and "import " in text["python_stdlib"]
    if "cpp_headers" in text:
        assert "#include" in text["cpp_headers"] or "#pragma once" in text["cpp_headers"]
    if "licenses" in text:
        assert "license" in text["licenses"].lower()


def test_deterministic_and_replaces_previous_harvest(harvested, tmp_path):
    out, domains = harvested
    again = tmp_path / "again"
    assert harvest_default_corpus(str(again), max_bytes_per_domain=150_000, seed=0) == domains
    for d in domains:
        for s in ("train", "valid", "test"):
            assert (again / d / f"{s}.jsonl").read_bytes() == (out / d / f"{s}.jsonl").read_bytes()
    # a previous harvest is replaced (atomically); another seed gives another split
    assert harvest_default_corpus(str(again), max_bytes_per_domain=150_000, seed=1) == domains
    assert any((again / d / "valid.jsonl").read_bytes() != (out / d / "valid.jsonl").read_bytes()
               for d in domains)


def test_refuses_to_replace_a_folder_that_is_not_a_harvest(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="harvest.json"):
        harvest_default_corpus(str(tmp_path / "mine"), max_bytes_per_domain=10_000)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_source_is_skipped_with_warning_and_too_few_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(embedded.SOURCES, "cpp_headers", (lambda: [], lambda t: t))
    with pytest.warns(UserWarning, match="skipping domain 'cpp_headers'"):
        with pytest.raises(ValueError, match=r"only 3 domains could be harvested.*need >= 4"):
            harvest_default_corpus(str(tmp_path / "c"), max_bytes_per_domain=20_000)
    assert not (tmp_path / "c").exists()
    monkeypatch.setitem(embedded.SOURCES, "extra", embedded.SOURCES["python_stdlib"])
    with pytest.warns(UserWarning, match="cpp_headers"):
        got = harvest_default_corpus(str(tmp_path / "c"), max_bytes_per_domain=20_000)
    assert "cpp_headers" not in got and len(got) == 4


def test_unknown_domain_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="python_stdlib, cpp_headers, licenses, package_docs"):
        harvest_default_corpus(str(tmp_path / "x"), domains=["python_stdlib", "poetry"])


def test_split_document_cuts_at_lines_and_covers_text():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(3000))
    pieces = split_document(text, max_bytes=4096)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 4096 and p.endswith("\n") for p in pieces)
    assert split_document("é" * 5000, max_bytes=1001) == ["é" * 500] * 10  # never splits a char
