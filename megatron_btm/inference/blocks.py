"""Evaluation blocks from preprocessed held-out documents.

A block is T+1 token ids (T = the model's seq_length): the model reads ids [0, T) and is scored
on ids [1, T]. Two layouts:

- "stream" (default): documents (eod last) concatenated in stored order and cut with stride T,
  so consecutive blocks share one id and every id after the first is scored exactly once.
  The domain posterior restarts at the prior in each block.
- "document": each document on its own, cut the same way (the posterior restarts per document).

A final partial block is padded with IGNORE (never scored). Deterministic: same data, same
blocks. `max_blocks` keeps the first N blocks (a prefix of the split).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

from megatron_btm.inference.scoring import IGNORE

LAYOUTS = ("stream", "document")


def cut_blocks(ids: Sequence[int], seq_length: int) -> list[list[int]]:
    """Blocks of seq_length+1 ids with stride seq_length; the last one padded with IGNORE.
    A sequence of fewer than 2 ids has nothing to score and gives no block."""
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be >= 1")
    out = []
    for start in range(0, max(len(ids) - 1, 0), seq_length):
        block = list(ids[start:start + seq_length + 1])
        out.append(block + [IGNORE] * (seq_length + 1 - len(block)))
    return out


def make_blocks(documents: Iterable[Sequence[int]], seq_length: int, *, layout: str = "stream",
                max_blocks: int | None = None) -> torch.Tensor:
    """[N, seq_length+1] int64 blocks from token-id documents (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: valid layouts are {list(LAYOUTS)}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks={max_blocks}: must be >= 1 or None")
    blocks: list[list[int]] = []
    if layout == "document":
        for doc in documents:
            blocks.extend(cut_blocks(doc, seq_length))
            if max_blocks is not None and len(blocks) >= max_blocks:
                break
    else:
        stream: list[int] = []
        # Only whole blocks are cut while reading (the last one may still grow); `max_blocks`
        # bounds how much of the split is read.
        for doc in documents:
            stream.extend(doc)
            if max_blocks is not None and len(stream) >= max_blocks * seq_length + 1:
                break
        blocks = cut_blocks(stream, seq_length)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return torch.tensor(blocks, dtype=torch.long).reshape(len(blocks), seq_length + 1)


def read_eval_blocks(data_dir: str | os.PathLike, domain: str, split: str, seq_length: int, *,
                     layout: str = "stream", max_blocks: int | None = None,
                     vocab_size: int | None = None) -> torch.Tensor:
    """Blocks of a preprocessed split (`<data_dir>/<domain>/<split>.bin/.idx`).

    With `vocab_size`, refuses data holding ids the models cannot read (a different tokenizer).
    """
    from megatron_btm.data.datasets import read_documents
    blocks = make_blocks(read_documents(data_dir, domain, split), seq_length, layout=layout,
                         max_blocks=max_blocks)
    if blocks.shape[0] == 0:
        raise ValueError(f"{data_dir}/{domain}/{split}: no tokens to evaluate (empty split)")
    if vocab_size is not None:
        top = int(blocks.max())
        if top >= vocab_size:
            raise ValueError(f"{data_dir}/{domain}/{split}: holds token id {top} but the models' "
                             f"vocab_size is {vocab_size} (data preprocessed with another tokenizer?)")
    return blocks


def num_scored_tokens(blocks_NT1: torch.Tensor) -> int:
    return int((blocks_NT1[:, 1:] != IGNORE).sum())
