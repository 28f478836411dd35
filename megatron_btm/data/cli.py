"""Tokenize JSONL corpora (<corpus>/<domain>/<split>.jsonl) into Megatron indexed datasets.

Writes <output>/tokenizer.json, <output>/<domain>/<split>.bin/.idx and <output>/report.json
(documents, tokens and skipped lines per domain/split), all atomically: the output folder
appears only when complete.
"""
from __future__ import annotations

import argparse

HELP = "tokenize JSONL domains into Megatron .bin/.idx datasets (+ tokenizer, report)"


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a comma-separated list")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus-dir", required=True,
                   help="folder with one subfolder per domain holding <split>.jsonl files")
    p.add_argument("--output-dir", required=True,
                   help="output folder (tokenizer.json, <domain>/<split>.bin/.idx, report.json)")
    p.add_argument("--domains", type=_csv, default=None,
                   help="comma-separated domains; None = every subfolder with .jsonl files")
    p.add_argument("--splits", type=_csv, default=["train", "valid", "test"],
                   help="comma-separated split names; <domain>/<split>.jsonl must exist")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a folder holding one, or a GPT-2 folder (encoder.json + "
                        "vocab.bpe); None = train a byte-level BPE on the train splits")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of a trained BPE")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="minimum pair count for a BPE merge (trained BPE only)")
    p.add_argument("--tokenizer-train-bytes", type=int, default=200_000_000,
                   help="at most this many bytes of text train the BPE (shared across domains)")
    p.add_argument("--sentence-split", action="store_true",
                   help="store each sentence as its own sequence (offline splitter, no download)")
    p.add_argument("--sentence-splitter", default="auto",
                   choices=["auto", "punkt-pretrained", "punkt-trained", "regex"],
                   help="sentence splitter (auto: installed punkt data, else punkt trained on the "
                        "domain's own text + an abbreviation list)")
    p.add_argument("--workers", type=int, default=2, help="encoding processes (1 = in-process)")
    p.add_argument("--chunk-lines", type=int, default=128, help="lines per task sent to a worker")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines and empty files instead of failing")
    p.add_argument("--max-docs", type=int, default=None,
                   help="stop each split after this many documents (quick runs); None = all")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder once the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(
        corpus_dir=args.corpus_dir, output_dir=args.output_dir, domains=args.domains,
        splits=tuple(args.splits), tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        min_frequency=args.min_frequency, tokenizer_train_bytes=args.tokenizer_train_bytes,
        sentence_split=args.sentence_split, sentence_splitter=args.sentence_splitter,
        workers=args.workers, chunk_lines=args.chunk_lines, skip_bad_lines=args.skip_bad_lines,
        max_docs=args.max_docs, overwrite=args.overwrite, progress=not args.no_progress)
    report = preprocess(cfg)
    print(report.table())
    print(f"wrote {args.output_dir}/report.json")
    return 0
