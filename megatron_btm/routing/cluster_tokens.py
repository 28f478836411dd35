"""Cluster routing over token ids: the text a model has read so far, kept up to date per token.

The cluster router embeds text; the models read token ids. `TokenPrefix` turns a growing list
of ids into text incrementally (HF `tokenizers`' DecodeStream: a byte-level BPE token can end
inside a UTF-8 character, so text is released only up to the last complete character) and
feeds it to the router's incremental `PrefixState` — nothing is re-vectorised from scratch.
The end-of-document id becomes a newline (a word boundary), so documents do not run together.

    prefix = TokenPrefix(router, tokenizer); prefix.extend(ids); log_w_K = prefix.log_weights(k)

`block_log_weights` gives the weights of every position of evaluation blocks: position t (which
predicts id t+1) is weighted by the text of ids 0..t of its block (the block's whole context,
documents before it included, as the LM reads it).
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_btm.routing.cluster import ClusterRouter, cluster_log_weights

EOD_TEXT = "\n"


class TokenPrefix:
    """Ids in, text to the router's prefix state; `text` is everything released so far."""

    def __init__(self, router: ClusterRouter, tokenizer, *, keep_text: bool = False):
        from tokenizers.decoders import DecodeStream
        self._stream_cls = DecodeStream
        self.router, self.tokenizer = router, tokenizer
        self.state = router.incremental()
        self._stream = DecodeStream(skip_special_tokens=False)
        self.keep_text = keep_text
        self.text = ""  # only with keep_text (tests and debugging)

    def _append_text(self, piece: str) -> None:
        if piece:
            self.state.append(piece)
            if self.keep_text:
                self.text += piece

    def append(self, token_id: int) -> "TokenPrefix":
        token_id = int(token_id)
        if token_id == self.tokenizer.eod:
            self._stream = self._stream_cls(skip_special_tokens=False)  # a new document
            self._append_text(EOD_TEXT)
        else:
            self._append_text(self._stream.step(self.tokenizer._hf, token_id) or "")
        return self

    def extend(self, ids) -> "TokenPrefix":
        for i in ids:
            self.append(i)
        return self

    def embedding(self) -> np.ndarray:
        return self.state.embedding()

    def log_weights(self, topk: int | None = None) -> torch.Tensor:
        """[K] float64 log weights (−inf outside the top k) of the prefix so far."""
        d = torch.from_numpy(self.router.model.distances(self.embedding()[None]))[0]
        return cluster_log_weights(d, self.router.temperature, topk)


class ClusterRouting:
    """Per-token cluster routing of B sequences (generation): one TokenPrefix per row."""

    def __init__(self, router: ClusterRouter, tokenizer, topk: int | None = None):
        if topk is not None and not 1 <= topk <= router.num_clusters:
            raise ValueError(f"cluster top-k={topk}: must be in [1, {router.num_clusters}] "
                             "(the number of experts)")
        self.router, self.tokenizer, self.topk = router, tokenizer, topk
        self.prefixes: list[TokenPrefix] = []

    def start(self, rows) -> "ClusterRouting":
        self.prefixes = [TokenPrefix(self.router, self.tokenizer).extend(r) for r in rows]
        return self

    def append(self, ids_B) -> None:
        for prefix, i in zip(self.prefixes, ids_B):
            prefix.append(i)

    def log_weights(self) -> torch.Tensor:
        """[B, K] float64 log weights of each row's prefix so far."""
        emb = np.stack([p.embedding() for p in self.prefixes])
        d = torch.from_numpy(self.router.model.distances(emb))
        return cluster_log_weights(d, self.router.temperature, self.topk)


def ids_text(tokenizer, ids) -> str:
    """The text of token ids decoded from scratch: documents (split at the eod id) decoded whole
    and joined by EOD_TEXT, replacement characters at the very end dropped (an unfinished
    character). For a document's text (branch weights); routing uses TokenPrefix."""
    parts, cur = [], []
    for i in list(ids) + [None]:
        if i is None or int(i) == tokenizer.eod:
            parts.append(tokenizer.decode(cur).rstrip("\ufffd") if i is None else tokenizer.decode(cur))
            cur = []
        else:
            cur.append(int(i))
    return EOD_TEXT.join(parts)


def block_embeddings(router: ClusterRouter, tokenizer, blocks_NT1: torch.Tensor) -> np.ndarray:
    """[N, T, dim] prefix embeddings of evaluation blocks [N, T+1] (position t: ids 0..t);
    positions whose input is padding (IGNORE < 0) repeat the last real prefix."""
    N, T1 = blocks_NT1.shape
    out = np.zeros((N, T1 - 1, router.model.featurizer.dim))
    for n, row in enumerate(blocks_NT1[:, :-1].tolist()):
        prefix = TokenPrefix(router, tokenizer)
        emb = prefix.embedding()
        for t, token_id in enumerate(row):
            if token_id >= 0:
                emb = prefix.append(token_id).embedding()
            out[n, t] = emb
    return out


def block_log_weights(router: ClusterRouter, tokenizer, blocks_NT1: torch.Tensor,
                      topk: int | None = None) -> torch.Tensor:
    """[N, T, K] float64 log mixture weights of every position (see the module docstring)."""
    emb_NTD = block_embeddings(router, tokenizer, blocks_NT1)
    N, T, D = emb_NTD.shape
    d = torch.from_numpy(router.model.distances(emb_NTD.reshape(N * T, D)))
    return cluster_log_weights(d, router.temperature, topk).reshape(N, T, -1)
