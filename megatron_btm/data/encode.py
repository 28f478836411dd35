"""The per-chunk work of preprocessing: parse lines, split sentences, encode, append eod.

Runs in pool workers (forked; this module stays light, no torch/Megatron, so "spawn" is cheap
too where fork is unavailable) or in-process when workers == 1. A chunk's result is plain
numpy/lists (cheap to pickle); a bad line comes back as data, not as an exception, and the
parent decides (raise or skip and count), so the first bad line in *file order* is reported.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron_btm.data.jsonl import BadLineError, SkipLine, parse_line

_WORKER: dict = {}


@dataclass
class ChunkResult:
    tokens: np.ndarray                                 # int32, all documents' tokens, concatenated
    seq_lengths: list[int] = field(default_factory=list)    # one per sequence (sentence or document)
    doc_num_seqs: list[int] = field(default_factory=list)   # sequences per document
    text_bytes: int = 0
    raw_bytes: int = 0                                 # bytes of the file this chunk covered
    skipped: Counter = field(default_factory=Counter)
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (lineno, reason, detail)


def init_worker(tokenizer, splitter) -> None:
    """Per-process state (pool initializer, or called in-process when workers == 1)."""
    _WORKER["tokenizer"], _WORKER["splitter"] = tokenizer, splitter


def encode_chunk(task: tuple[str, int, list[bytes]]) -> ChunkResult:
    """Encode lines [start, start+len) of `path`; each document ends with the eod id."""
    path, start_lineno, lines = task
    tok, splitter = _WORKER["tokenizer"], _WORKER["splitter"]
    res = ChunkResult(tokens=np.zeros(0, dtype=np.int32))
    pieces: list[str] = []
    for lineno, raw in enumerate(lines, start=start_lineno):
        res.raw_bytes += len(raw) + 1
        try:
            text = parse_line(raw, path, lineno)
        except SkipLine as s:
            res.skipped[s.reason] += 1
            continue
        except BadLineError as e:
            res.skipped[e.reason] += 1
            res.bad.append((lineno, e.reason, e.detail))
            continue
        res.text_bytes += len(raw)
        sentences = splitter.split(text) if splitter is not None else [text]
        pieces.extend(sentences)
        res.doc_num_seqs.append(len(sentences))
    encoded = tok.encode_batch(pieces) if pieces else []
    out: list[list[int]] = []
    i = 0
    for n in res.doc_num_seqs:
        doc = encoded[i:i + n]
        i += n
        doc[-1] = doc[-1] + [tok.eod]
        for seq in doc:
            res.seq_lengths.append(len(seq))
            out.append(seq)
    if out:
        res.tokens = np.fromiter((t for seq in out for t in seq), dtype=np.int32,
                                 count=sum(res.seq_lengths))
    return res
