"""Tokenize JSONL corpora (--corpus DIR: <domain>/<split>.jsonl) into Megatron indexed datasets.

Writes <output>/tokenizer.json, <output>/<domain>/<split>.bin/.idx and <output>/report.json
(documents, tokens and skipped lines per domain/split), all atomically: the output folder
appears only when complete.
"""
from __future__ import annotations

import argparse

from megatron_btm import cli_args

HELP = "tokenize JSONL domains into Megatron .bin/.idx datasets (+ tokenizer, report)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli_args.add_corpus(p)
    cli_args.add_output(p, metavar="DIR",
                        help="output folder (tokenizer.json, <domain>/<split>.bin/.idx, report.json)")
    cli_args.add_domains(p, required=False,
                         help="comma-separated domains; default: every subfolder with .jsonl files")
    p.add_argument("--splits", type=cli_args.comma_list("--splits"), default=["train", "valid", "test"],
                   metavar="A,B", help="comma-separated split names; <domain>/<split>.jsonl must exist")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a folder holding one (a Hugging Face model folder or an "
                        "imported checkpoint: checked against the model's vocab_size), or a GPT-2 "
                        "folder (encoder.json + vocab.bpe); documents end with <|endoftext|>, else "
                        "with the model's eos token; None = train a byte-level BPE on the train "
                        "splits")
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
    cli_args.add_no_progress(p)


def run(args: argparse.Namespace) -> int:
    from megatron_btm.data.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(
        corpus_dir=args.corpus, output_dir=args.output, domains=args.domains,
        splits=tuple(args.splits), tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        min_frequency=args.min_frequency, tokenizer_train_bytes=args.tokenizer_train_bytes,
        sentence_split=args.sentence_split, sentence_splitter=args.sentence_splitter,
        workers=args.workers, chunk_lines=args.chunk_lines, skip_bad_lines=args.skip_bad_lines,
        max_docs=args.max_docs, overwrite=args.overwrite, progress=not args.no_progress)
    report = preprocess(cfg)
    print(report.table())
    print(f"wrote {args.output}/report.json")
    return 0
