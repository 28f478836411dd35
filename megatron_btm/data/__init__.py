"""Data: JSONL corpora → tokenizer → Megatron indexed datasets (.bin/.idx) → GPT datasets.

    jsonl.py       strict reading of `{"text": ...}` lines; bad lines name file and line
    tokenizer.py   byte-level BPE (train / load / GPT-2 files) + the adapter Megatron's datasets need
    sentences.py   offline sentence splitting (punkt trained on the corpus + abbreviation rule)
    encode.py      the per-chunk worker (parse, split, encode) run in a process pool
    preprocess.py  PreprocessConfig, preprocess() → <out>/<domain>/<split>.bin/.idx + report.json
    report.py      Report / SplitStats (report.json and the printed table)
    _perms.py      open a finished output tree up to the user's umask (mkstemp makes 0600)
    datasets.py    GPTDataset / BlendedMegatronDatasetBuilder for training and per-domain validation
    embedded.py    the demo's default corpus, harvested from this installation (never downloaded)
    cli.py         `btm preprocess`

Importing this package is cheap; torch/Megatron are imported only where datasets are built.
"""
