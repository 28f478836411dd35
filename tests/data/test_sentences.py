"""Sentence splitting works offline (no download is ever attempted) and keeps abbreviations."""
import socket

import pytest

from megatron_btm.data.jsonl import iter_texts
from megatron_btm.data.sentences import SentenceSplitter, make_splitter, punkt_pretrained_available

TEXT = ("Mr. Holmes met Dr. Watson at the station. They spoke of Mrs. Hudson, St. Albans and "
        "Prof. Moriarty, e.g. his plans. It rained!  Then the train left.\nA new line began here.")
EXPECTED = ["Mr. Holmes met Dr. Watson at the station. ",
            "They spoke of Mrs. Hudson, St. Albans and Prof. Moriarty, e.g. his plans. ",
            "It rained!  ", "Then the train left.\n", "A new line began here."]


@pytest.fixture
def offline(monkeypatch):
    """Any download attempt fails the test: nltk.download and every socket connection."""
    import nltk

    def forbidden(*a, **k):
        raise AssertionError("a download / network connection was attempted")
    monkeypatch.setattr(nltk, "download", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)


def test_auto_splitter_is_offline_and_keeps_abbreviations(offline, corpus_slice):
    samples = iter_texts(corpus_slice / "novels" / "train.jsonl", max_bytes=300_000)
    splitter = make_splitter("auto", samples)
    assert splitter.kind == ("punkt-pretrained" if punkt_pretrained_available() else "punkt-trained")
    assert splitter.split(TEXT) == EXPECTED


def test_trained_punkt_without_samples_still_knows_abbreviations(offline):
    splitter = make_splitter("punkt-trained", [])
    assert splitter.split(TEXT) == EXPECTED


def test_regex_fallback(offline):
    splitter = make_splitter("regex")
    assert splitter.split(TEXT) == EXPECTED
    assert splitter.split("He met J. R. Smith today. Fine.") == ["He met J. R. Smith today. ", "Fine."]


def test_pieces_cover_the_text_exactly(corpus_slice):
    splitter = make_splitter("punkt-trained", iter_texts(corpus_slice / "bible" / "train.jsonl"))
    for text in iter_texts(corpus_slice / "novels" / "valid.jsonl"):
        pieces = splitter.split(text)
        assert "".join(pieces) == text
        assert all(p for p in pieces) and len(pieces) > 1


def test_pretrained_punkt_refused_when_data_absent(offline):
    if punkt_pretrained_available():
        pytest.skip("NLTK punkt data is installed on this machine")
    with pytest.raises(ValueError, match="never downloaded"):
        make_splitter("punkt-pretrained")


def test_unknown_splitter_lists_valid_kinds():
    with pytest.raises(ValueError, match="punkt-pretrained, punkt-trained, regex"):
        SentenceSplitter("spacy")
