"""Strict reading of JSONL corpora: one `{"text": "..."}` object a line.

Every problem is reported with the file and the 1-based line number, so a user can open the file
at the right place. A *bad* line (malformed JSON, non-UTF-8 bytes, no "text" key, "text" not a
string, not an object) is an error unless the caller asked to skip bad lines, in which case it is
skipped and counted by reason. A blank line or an empty/whitespace-only "text" is not malformed:
it carries no document, so it is always skipped and counted (reasons `blank_line`, `empty_text`).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

# Reasons a line yields no document; the keys of the report's `skipped` dicts.
BAD_REASONS = ("not_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_string")
BENIGN_REASONS = ("blank_line", "empty_text")


class BadLineError(ValueError):
    """A line of a JSONL file that is not a `{"text": <string>}` object."""

    def __init__(self, path: str | os.PathLike, lineno: int, reason: str, detail: str):
        self.path, self.lineno, self.reason, self.detail = str(path), lineno, reason, detail
        super().__init__(f"{path}: line {lineno}: {detail}"
                         " (fix the line, or pass --skip-bad-lines to skip and count it)")


class SkipLine(Exception):
    """Internal: a benign line without a document (blank line, empty text)."""

    def __init__(self, reason: str):
        self.reason = reason


def parse_line(raw: bytes, path: str, lineno: int) -> str:
    """The document text of one raw line (without its newline).

    Raises BadLineError for a malformed line and SkipLine for a benign empty one.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1].hex()
        raise BadLineError(path, lineno, "not_utf8",
                           f"not valid UTF-8 (byte 0x{bad} at byte offset {e.start} of the line)") from None
    if lineno == 1 and line.startswith("\ufeff"):
        line = line[1:]  # a UTF-8 byte-order mark some editors write: not part of the JSON
    if not line.strip():
        raise SkipLine("blank_line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLineError(path, lineno, "malformed_json",
                           f"malformed JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise BadLineError(path, lineno, "not_an_object",
                           f'expected a JSON object {{"text": ...}}, got {type(obj).__name__}')
    if "text" not in obj:
        keys = ", ".join(sorted(map(str, obj)))[:200] or "none"
        raise BadLineError(path, lineno, "missing_text", f'no "text" key (keys: {keys})')
    text = obj["text"]
    if not isinstance(text, str):
        raise BadLineError(path, lineno, "text_not_string",
                           f'"text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise SkipLine("empty_text")
    return text


def check_nonempty(path: str | os.PathLike) -> None:
    """Raise a clear error for a missing or empty JSONL file."""
    path = Path(path)
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.jsonl")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"{path}: file not found (present in {path.parent}: "
                                f"{', '.join(present) or 'no .jsonl files'})")
    if path.stat().st_size == 0:
        raise BadLineError(path, 1, "empty_file", "empty file: no lines, no documents")


def iter_raw_lines(path: str | os.PathLike, start_lineno: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes without the newline) for every line of a file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=start_lineno):
            yield lineno, raw.rstrip(b"\r\n")


def iter_texts(path: str | os.PathLike, *, skip_bad_lines: bool = False,
               skipped: Counter | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """The document texts of a JSONL file, in order (single process; used for tokenizer training).

    `skipped` (if given) is incremented per skip reason; `max_bytes` stops after that many bytes
    of text have been yielded (the document that crosses the limit is included).
    """
    check_nonempty(path)
    total = 0
    for lineno, raw in iter_raw_lines(path):
        try:
            text = parse_line(raw, str(path), lineno)
        except SkipLine as s:
            if skipped is not None:
                skipped[s.reason] += 1
            continue
        except BadLineError as e:
            if not skip_bad_lines:
                raise
            if skipped is not None:
                skipped[e.reason] += 1
            continue
        yield text
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            return


def domain_split_file(corpus_dir: str | os.PathLike, domain: str, split: str) -> Path:
    """`<corpus_dir>/<domain>/<split>.jsonl`, with clear errors for a missing domain or split."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"{corpus_dir}: corpus folder not found")
    folder = corpus_dir / domain
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: domain folder not found (domains in {corpus_dir}: "
                                f"{', '.join(list_domains(corpus_dir)) or 'none'})")
    path = folder / f"{split}.jsonl"
    check_nonempty(path)
    return path


def list_domains(corpus_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the subfolders of `corpus_dir` that hold at least one .jsonl file."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        return []
    return sorted(p.name for p in corpus_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.jsonl")))
