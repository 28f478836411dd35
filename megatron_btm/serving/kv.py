"""A KV cache for one expert through Megatron-Core's own static inference context.

`KVDecoder(expert, batch, max_len)` holds a `megatron.core.inference.contexts.StaticInferenceContext`
(the context Megatron's static engine passes to `GPTModel.forward(inference_context=...)`):
`prefill(ids_BT)` runs the first T positions of B left-aligned sequences and returns their
logits [B, T, V]; `step(ids_B)` feeds one more position for every sequence and returns [B, V].
Logits are over the real vocabulary, in the model's dtype, on the model's device.

Two things the pinned megatron-core 0.16 needs on a CPU run, handled here without touching
Megatron internals:
- `Attention._allocate_memory` allocates the cache on `torch.cuda.current_device()`: we give the
  context its per-layer buffers ourselves (`key_value_memory_dict`, which Megatron fills only
  for layers that have none), shaped as Megatron's own [max_len, batch, groups, head_dim].
- The CPU spec's `SDPACoreAttention` always applies a top-left causal mask; after the prompt
  Megatron asks for `no_mask` (one query against every cached key). `_mask_aware` switches the
  loaded model's core-attention instances to a subclass that honours `attn_mask_type`
  (TE's attention, the GPU spec, already does). Proposed upstream fix: the same two lines in
  `megatron/specs.py`.

Beyond `max_len` (at most the model's seq_length, the positions it has) the caller falls back
to recomputing a sliding window (inference.generate does).
"""
from __future__ import annotations

import torch

from megatron_btm.errors import ConfigError


_CACHED_CLASS = None


def _cached_attention_class():
    """SDPACoreAttention that honours attn_mask_type=no_mask (built once, on first use)."""
    global _CACHED_CLASS
    if _CACHED_CLASS is None:
        from megatron.core.transformer.enums import AttnMaskType

        from megatron_btm.megatron.specs import SDPACoreAttention

        class CachedSDPACoreAttention(SDPACoreAttention):
            def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
                if attn_mask_type != AttnMaskType.no_mask or query.size(0) == key.size(0):
                    return super().forward(query, key, value, attention_mask, attn_mask_type, **kwargs)
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
                if k.size(1) != q.size(1):  # grouped-query attention
                    rep = q.size(1) // k.size(1)
                    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
                return out.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)

        _CACHED_CLASS = (SDPACoreAttention, CachedSDPACoreAttention)
    return _CACHED_CLASS


def _mask_aware(model) -> None:
    base, cached = _cached_attention_class()
    for module in model.modules():
        if type(module) is base:
            module.__class__ = cached


class KVDecoder:
    """Incremental decoding of `expert` (scoring.Expert) for `batch` sequences of <= max_len."""

    def __init__(self, expert, batch: int, max_len: int):
        from megatron.core.inference.contexts import StaticInferenceContext
        if not 1 <= max_len <= expert.seq_length:
            raise ConfigError(f"KV cache length {max_len}: must be in [1, seq_length="
                              f"{expert.seq_length}] of {expert.name}")
        self.expert, self.batch, self.max_len = expert, batch, max_len
        model = expert.model
        _mask_aware(model)
        self.ctx = StaticInferenceContext(batch, max_len)
        self.ctx.materialize_only_last_token_logits = False
        param = next(model.parameters())
        with torch.inference_mode():
            self._allocate(model, batch, max_len, param)

    def _allocate(self, model, batch: int, max_len: int, param) -> None:
        for layer in model.decoder.layers:
            attn = layer.self_attention
            groups = attn.num_query_groups_per_partition
            self.ctx.key_value_memory_dict[attn.layer_number] = tuple(
                torch.empty(max_len, batch, groups, dim, dtype=param.dtype, device=param.device)
                for dim in (attn.key_hidden_size, attn.val_hidden_size))

    @property
    def length(self) -> int:
        return self.ctx.sequence_len_offset

    def _forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        B, T = ids_BT.shape
        if B != self.batch:
            raise ValueError(f"KV cache holds {self.batch} sequences, got a batch of {B}")
        start = self.ctx.sequence_len_offset
        if start + T > self.max_len:
            raise ValueError(f"KV cache full: {start} + {T} positions exceed {self.max_len}")
        device = self.expert.device
        pos_BT = torch.arange(start, start + T, device=device).unsqueeze(0).expand(B, T)
        with torch.inference_mode():  # cheaper than no_grad through Megatron's autograd Functions
            logits = self.expert.model(ids_BT.long().to(device), pos_BT, None,
                                       inference_context=self.ctx, runtime_gather_output=True)
        self.ctx.sequence_len_offset += T
        return logits[..., :self.expert.vocab_size]

    def prefill(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """[B, T, V] logits of the first T positions (the cache must be empty)."""
        if self.ctx.sequence_len_offset:
            raise ValueError("prefill: the KV cache already holds positions; use step()")
        return self._forward(ids_BT)

    def step(self, ids_B: torch.Tensor) -> torch.Tensor:
        """[B, V] logits after feeding one more id per sequence."""
        return self._forward(ids_B.reshape(-1, 1))[:, -1]
