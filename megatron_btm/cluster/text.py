"""Words of a document (c-BTM's analyzer) and the documents of a corpus.

Analyzer, exactly: the maximal runs of >= 2 word characters (`\\w`, Unicode; scikit-learn's
default token pattern `\\b\\w\\w+\\b` finds the same runs) of the original text; each run is
lower-cased; a run starting with a digit becomes the placeholder `#number` (c-BTM's
NumberNormalizingVectorizer); English stop words (scikit-learn's list, stored in the artefact)
are dropped. Lower-casing after tokenising (not before) makes the tokens of a text the
concatenation of the tokens of its complete runs, which the incremental prefix embedding relies
on (`split_complete`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from megatron_btm.data import jsonl

WORD_RE = re.compile(r"\w\w+")
TRAILING_WORD_RE = re.compile(r"\w*\Z")
NUMBER_TOKEN = "#number"  # '#' is not a word character: no real token can equal it


@dataclass(kw_only=True)
class Analyzer:
    stop_words: frozenset[str] = field(default_factory=frozenset)
    """Lower-cased tokens dropped from every document."""

    def tokens(self, text: str) -> list[str]:
        out = []
        for run in WORD_RE.findall(text):
            tok = run.lower()
            if tok[0].isdigit():
                tok = NUMBER_TOKEN
            elif tok in self.stop_words:
                continue
            out.append(tok)
        return out

    def to_json(self) -> dict:
        return {"token_pattern": WORD_RE.pattern, "lowercase": "after_tokenising",
                "number_token": NUMBER_TOKEN, "stop_words": sorted(self.stop_words)}

    @classmethod
    def from_json(cls, obj: dict, where: str) -> "Analyzer":
        if obj.get("token_pattern") != WORD_RE.pattern or obj.get("number_token") != NUMBER_TOKEN:
            raise ValueError(f"{where}: analyzer {obj.get('token_pattern')!r}/"
                             f"{obj.get('number_token')!r} is not this version's "
                             f"({WORD_RE.pattern!r}/{NUMBER_TOKEN!r})")
        words = obj.get("stop_words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{where}: analyzer.stop_words must be a list of strings")
        return cls(stop_words=frozenset(words))


def english_stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    return frozenset(ENGLISH_STOP_WORDS)


def split_complete(buffer: str) -> tuple[str, str]:
    """(complete, pending): `pending` is the trailing run of word characters, which more text
    could still extend; every run in `complete` is final."""
    start = TRAILING_WORD_RE.search(buffer).start()
    return buffer[:start], buffer[start:]


# ---- corpus ----------------------------------------------------------------------------------

def resolve_domains(corpus: str | Path, domains: Sequence[str] | None) -> list[str]:
    """The domains to read: the given ones, or every subfolder holding .jsonl files."""
    if domains is not None:
        if not domains:
            raise ValueError("domains=[]: give at least one domain, or none for all")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains={list(domains)}: duplicates")
        return list(domains)
    found = jsonl.list_domains(corpus)
    if not found:
        if not Path(corpus).is_dir():
            raise FileNotFoundError(f"{corpus}: corpus folder not found")
        raise ValueError(f"{corpus}: no domain folders with .jsonl files (an empty corpus)")
    return found


def split_files(corpus: str | Path, domains: Sequence[str], split: str) -> list[Path]:
    """`<corpus>/<domain>/<split>.jsonl` for each domain; every missing file found up front."""
    return [jsonl.domain_split_file(corpus, d, split) for d in domains]


def iter_documents(files: Sequence[Path], *, skip_bad_lines: bool = False
                   ) -> Iterator[tuple[int, str]]:
    """(index of the file's domain, text) of every document, file by file, in order."""
    for i, path in enumerate(files):
        for text in jsonl.iter_texts(path, skip_bad_lines=skip_bad_lines):
            yield i, text


def batched(items: Iterator, size: int) -> Iterator[list]:
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
