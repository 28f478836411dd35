#!/usr/bin/env python3
"""Preprocess JSONL corpora into Megatron indexed datasets: same as `btm preprocess`.

    python tools/preprocess_data.py --corpus CORPUS --output OUT [options]

A thin wrapper for checkouts where the `btm` entry point is not installed.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_btm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
