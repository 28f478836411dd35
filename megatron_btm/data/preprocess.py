"""JSONL per domain → tokenizer.json + Megatron indexed datasets per domain and split + report.

Output layout (docs/CONTRACTS.md, data part):

    <output_dir>/tokenizer.json              the BPE every dataset below was encoded with
    <output_dir>/<domain>/<split>.bin/.idx   Megatron IndexedDataset (IndexedDatasetBuilder)
    <output_dir>/report.json                 per domain/split: documents, tokens, skipped lines

Atomicity: the whole output is built in a `.tmp-` sibling folder and renamed into place as the
very last step, so a killed or failed run leaves nothing that looks complete under output_dir.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_btm.data import jsonl
from megatron_btm.data._perms import apply_umask
from megatron_btm.data.encode import ChunkResult, encode_chunk, init_worker
from megatron_btm.data.report import Report, SplitStats
from megatron_btm.utils.io import atomic_dir, atomic_write_json

MAX_BAD_EXAMPLES = 20  # bad lines listed (with line numbers) per split in report.json


def _check_names(key: str, names, what: str, if_empty: str) -> None:
    """A non-empty list of distinct file/folder names (no '/', not starting with '.')."""
    if not names:
        raise ValueError(if_empty)
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise ValueError(f"{key}: {n!r} is not a valid {what}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}={names}: duplicates")


@dataclass(kw_only=True)
class PreprocessConfig:
    corpus_dir: str
    """Folder with one subfolder per domain, each holding <split>.jsonl files."""
    output_dir: str
    """Where tokenizer.json, <domain>/<split>.bin/.idx and report.json are written."""
    domains: list[str] | None = None
    """Domains to preprocess; None = every subfolder of corpus_dir holding .jsonl files."""
    splits: tuple[str, ...] = ("train", "valid", "test")
    """Split files to preprocess (<domain>/<split>.jsonl); each must exist."""
    tokenizer: str | None = None
    """tokenizer.json, a folder holding one, or a GPT-2 folder (encoder.json + vocab.bpe);
    None = train a byte-level BPE on the train split of the selected domains."""
    vocab_size: int = 8192
    """Vocabulary size of the trained BPE (ignored when `tokenizer` is given)."""
    min_frequency: int = 2
    """Minimum pair count for a BPE merge (trained BPE only)."""
    tokenizer_train_bytes: int | None = 200_000_000
    """At most this many bytes of text train the BPE, shared equally across domains."""
    sentence_split: bool = False
    """Store each sentence as its own sequence (Megatron's --split-sentences); the document's
    last sentence ends with eod. Off for GPT training: GPTDataset then shuffles sentences."""
    sentence_splitter: str = "auto"
    """auto | punkt-pretrained | punkt-trained | regex (see megatron_btm/data/sentences.py)."""
    sentence_train_bytes: int = 1_000_000
    """Bytes of each domain's own text used to train its punkt splitter."""
    workers: int = 2
    """Encoding processes; 1 = encode in this process."""
    chunk_lines: int = 128
    """Lines per task sent to a worker."""
    skip_bad_lines: bool = False
    """Skip and count malformed lines (and empty files) instead of stopping at the first one."""
    max_docs: int | None = None
    """Stop each split after this many documents (quick runs, tests)."""
    overwrite: bool = False
    """Replace an existing output_dir (atomically, once the new one is complete)."""
    progress: bool = True
    """Show a tqdm progress bar per domain/split on stderr."""

    def __post_init__(self):
        from megatron_btm.data.sentences import SPLITTER_KINDS
        self.splits = tuple(self.splits)
        _check_names("splits", self.splits, "split name (a file stem like 'train')",
                     "splits=(): need at least one split")
        if self.domains is not None:
            self.domains = list(self.domains)
            _check_names("domains", self.domains, "domain folder name",
                         "domains=[]: give at least one domain, or None for all")
        for key in ("vocab_size", "min_frequency", "workers", "chunk_lines", "sentence_train_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
        for key in ("tokenizer_train_bytes", "max_docs"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"{key}={v}: must be >= 1 or None")
        if self.tokenizer is None and self.vocab_size < 257:
            raise ValueError(f"vocab_size={self.vocab_size}: must be >= 257 (256 bytes + eod)")
        if self.sentence_splitter not in ("auto",) + SPLITTER_KINDS:
            raise ValueError(f"sentence_splitter={self.sentence_splitter!r}: unknown; valid: "
                             f"{', '.join(('auto',) + SPLITTER_KINDS)}")
        if Path(self.output_dir).resolve() == Path(self.corpus_dir).resolve():
            raise ValueError(f"output_dir={self.output_dir}: must differ from corpus_dir")


def _resolve_inputs(cfg: PreprocessConfig) -> tuple[list[str], dict[tuple[str, str], Path]]:
    """Domains and their split files; every problem is found before any work starts."""
    domains = cfg.domains if cfg.domains is not None else jsonl.list_domains(cfg.corpus_dir)
    if not domains:
        if not Path(cfg.corpus_dir).is_dir():
            raise FileNotFoundError(f"{cfg.corpus_dir}: corpus folder not found")
        raise ValueError(f"{cfg.corpus_dir}: no domain folders with .jsonl files")
    files = {}
    for d in domains:
        for s in cfg.splits:
            try:
                files[d, s] = jsonl.domain_split_file(cfg.corpus_dir, d, s)
            except jsonl.BadLineError as e:
                if not (cfg.skip_bad_lines and e.reason == "empty_file"):
                    raise
                files[d, s] = Path(e.path)
    return domains, files


def _chunks(path: Path, chunk_lines: int) -> Iterator[tuple[str, int, list[bytes]]]:
    buf, start = [], 1
    for lineno, raw in jsonl.iter_raw_lines(path):
        if not buf:
            start = lineno
        buf.append(raw)
        if len(buf) == chunk_lines:
            yield str(path), start, buf
            buf = []
    if buf:
        yield str(path), start, buf


def _results(pool, tasks: Iterator, workers: int) -> Iterator[ChunkResult]:
    """Chunk results in file order; at most 4 chunks per worker in flight (bounded memory)."""
    if pool is None:
        for t in tasks:
            yield encode_chunk(t)
        return
    pending: deque = deque()
    for t in tasks:
        pending.append(pool.apply_async(encode_chunk, (t,)))
        if len(pending) >= 4 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _encode_split(cfg: PreprocessConfig, path: Path, prefix: Path, vocab_size: int,
                  pool, stats: SplitStats) -> None:
    """Encode one split file into prefix.bin/.idx. A split with no documents gets no files
    (Megatron cannot mmap an empty .bin); report.json records it with documents = 0."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    builder = None  # created at the first document
    if path.stat().st_size == 0:  # only reached with skip_bad_lines
        stats.skipped["empty_file"] += 1
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"{prefix.parent.name}/"
               f"{prefix.name}", disable=not cfg.progress, file=sys.stderr, leave=False)
    try:
        for res in _results(pool, _chunks(path, cfg.chunk_lines), cfg.workers):
            if res.bad and not cfg.skip_bad_lines:
                raise jsonl.BadLineError(path, *res.bad[0])
            stats.skipped.update(res.skipped)
            for lineno, reason, _ in res.bad:
                if len(stats.bad_examples) < MAX_BAD_EXAMPLES:
                    stats.bad_examples.append({"line": lineno, "reason": reason})
            offset, seq = 0, 0
            for n in res.doc_num_seqs:
                if cfg.max_docs is not None and stats.documents >= cfg.max_docs:
                    break
                if builder is None:
                    prefix.parent.mkdir(parents=True, exist_ok=True)
                    builder = IndexedDatasetBuilder(f"{prefix}.bin",
                                                    dtype=DType.optimal_dtype(vocab_size))
                lengths = res.seq_lengths[seq:seq + n]
                size = sum(lengths)
                builder.add_document(res.tokens[offset:offset + size], lengths)
                offset, seq = offset + size, seq + n
                stats.documents += 1
                stats.sequences += n
                stats.tokens += size
            stats.text_bytes += res.text_bytes
            bar.update(res.raw_bytes)
            if cfg.max_docs is not None and stats.documents >= cfg.max_docs:
                break
    finally:
        bar.close()
    if builder is not None:
        builder.finalize(f"{prefix}.idx")


def _make_pool(cfg: PreprocessConfig, tokenizer, splitter):
    init_worker(tokenizer, splitter)  # the in-process path uses the same globals
    if cfg.workers == 1:
        return None
    import multiprocessing as mp
    # fork where available (as Megatron's tools/preprocess_data.py): "spawn" would re-import the
    # caller's __main__ in every worker and fail in scripts without a __main__ guard. The workers
    # only run the Rust tokenizer, single-threaded: with TOKENIZERS_PARALLELISM=false in their
    # environment it never touches the thread pool the parent may have started (BPE training).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the forked workers
    try:
        return mp.get_context(method).Pool(cfg.workers, initializer=init_worker,
                                           initargs=(tokenizer, splitter))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _make_splitter(cfg: PreprocessConfig, files: dict, domain: str):
    from megatron_btm.data.sentences import make_splitter
    sample_split = "train" if (domain, "train") in files else cfg.splits[0]
    path = files[domain, sample_split]
    texts = (jsonl.iter_texts(path, skip_bad_lines=cfg.skip_bad_lines,
                              max_bytes=cfg.sentence_train_bytes)
             if path.stat().st_size else iter(()))
    return make_splitter(cfg.sentence_splitter, texts)


def _get_tokenizer(cfg: PreprocessConfig, domains: list[str], files: dict, out: Path):
    from megatron_btm.data.tokenizer import load_tokenizer, train_bpe
    if cfg.tokenizer is not None:
        return _given_tokenizer(cfg.tokenizer, out)
    split = "train" if "train" in cfg.splits else cfg.splits[0]
    paths = [files[d, split] for d in domains if files[d, split].stat().st_size]
    if not paths:
        raise ValueError(f"no non-empty {split} files to train a tokenizer on")
    skipped: Counter = Counter()
    tok = train_bpe(paths, cfg.vocab_size, out / "tokenizer.json", min_frequency=cfg.min_frequency,
                    max_bytes=cfg.tokenizer_train_bytes, skip_bad_lines=cfg.skip_bad_lines,
                    skipped=skipped)
    return tok, {"source": f"trained on {split} split of {len(paths)} domains", "trained": True,
                 "requested_vocab_size": cfg.vocab_size, "train_skipped": dict(skipped)}


def _given_tokenizer(source: str, out: Path):
    """A given tokenizer (file, folder, HF model folder or checkpoint), checked against the model's
    vocabulary when the folder names a model; which token ends a document is recorded."""
    from megatron_btm.data.tokenizer import check_model_vocab, load_tokenizer
    tok = load_tokenizer(source)
    model_vocab = check_model_vocab(tok, source)
    tok.save(out / "tokenizer.json")
    return tok, {"source": str(source), "trained": False, "eod_token": tok.eod_token,
                 "eod_source": tok.eod_source, "model_vocab_size": model_vocab}


def preprocess(cfg: PreprocessConfig) -> Report:
    """Run the whole preprocessing; return (and write) the report. See the module docstring."""
    t0 = time.time()
    domains, files = _resolve_inputs(cfg)
    final = Path(cfg.output_dir)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty folder someone created for us is not "existing output"
    with atomic_dir(final, overwrite=cfg.overwrite) as tmp:
        tok, tok_info = _get_tokenizer(cfg, domains, files, tmp)
        report = Report(tokenizer={**tok_info, "vocab_size": tok.vocab_size, "eod": tok.eod,
                                   "sha256": tok.sha256, "path": "tokenizer.json"},
                        config=dataclasses.asdict(cfg))
        for d in domains:
            splitter = _make_splitter(cfg, files, d) if cfg.sentence_split else None
            if splitter is not None:
                report.sentence_splitter = splitter.kind
            pool = _make_pool(cfg, tok, splitter)
            try:
                for s in cfg.splits:
                    stats = report.add(d, s, source=str(files[d, s]))
                    t_split = time.time()
                    _encode_split(cfg, files[d, s], tmp / d / s, tok.vocab_size, pool, stats)
                    stats.seconds = round(time.time() - t_split, 3)
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
        report.seconds = round(time.time() - t0, 3)
        atomic_write_json(tmp / "report.json", report.to_dict())
        apply_umask(tmp)
    return report
