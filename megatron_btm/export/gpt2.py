"""GPT-2 views of the shared GPT-2 mapping table (`megatron_btm.hf.mapping.GPT2`).

Megatron GPTModel with the `gpt2` preset (pre-LN, GeLU, biases, learned absolute positions,
final LN, tied embeddings by default) is GPT2LMHeadModel; the key map, the Conv1D transposes and
the fused-QKV reorder live in the table (one per family, read by import and export alike). These
functions keep the GPT-2-specific signatures the benchmarks and tests use.

The vocabulary: Megatron pads it to a multiple of 128 (TP-independent). By default the export
slices the padding off (HF vocab = the tokenizer's), so generation can never emit an id the
tokenizer cannot decode; the logits of real tokens are unchanged, and the padded rows were never
targets in training, so their probability mass is negligible (not exactly zero: a softmax over
the sliced vocab renormalises it away). `keep_padded_vocab` keeps them.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import torch

from megatron_btm.hf import convert
from megatron_btm.hf.mapping import GPT2, LAYERS, split_qkv

WORD_EMB = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
__all__ = ["LAYERS", "WORD_EMB", "OUTPUT", "required_keys", "split_fused_qkv", "megatron_to_gpt2",
           "gpt2_config_kwargs"]


def _cfg(num_layers: int = 0, num_heads: int = 1, tie_embeddings: bool = True):
    return SimpleNamespace(num_layers=num_layers, num_attention_heads=num_heads, query_groups=num_heads,
                           tie_embeddings=tie_embeddings)


def required_keys(available, tie_embeddings: bool) -> list[str]:
    """The Megatron keys the export reads, resolving which layer-norm naming the checkpoint uses."""
    return convert.required_keys(available, _cfg(tie_embeddings=tie_embeddings), GPT2)


def split_fused_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int) -> torch.Tensor:
    """Megatron fused QKV rows (weight [(np+2ng)·hn, h] or bias [(np+2ng)·hn]) → [q | k | v] rows."""
    return torch.cat(split_qkv(qkv, num_heads, num_query_groups), dim=0)


def megatron_to_gpt2(state: Mapping[str, torch.Tensor], *, num_layers: int, num_heads: int,
                     vocab_size: int, tie_embeddings: bool,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Map Megatron global tensors (layers stacked on axis 0) to GPT2LMHeadModel's state dict."""
    return convert.megatron_to_hf(state, _cfg(num_layers, num_heads, tie_embeddings), GPT2,
                                  vocab_size=vocab_size, dtype=dtype)


def gpt2_config_kwargs(model_config: Mapping[str, Any], *, vocab_size: int, eos_token_id: int,
                       dtype_name: str) -> dict[str, Any]:
    """GPT2Config arguments equivalent to our GPTConfig (as stored in meta.json)."""
    from megatron_btm.hf.families import FAMILIES
    from megatron_btm.megatron.model import GPTConfig
    known = {k: v for k, v in model_config.items() if k in GPTConfig.__dataclass_fields__}
    kwargs = FAMILIES["GPT2LMHeadModel"].to_hf(GPTConfig(**known))
    return dict(kwargs, vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                architectures=["GPT2LMHeadModel"], dtype=dtype_name)
