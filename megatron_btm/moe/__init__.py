"""Mixture-of-experts from a forest (BTX / FlexOlmo), see docs/MOE.md.

- `layout`: tensor and object names of dense and MoE torch_dist checkpoints.
- `merge`: `merge_moe`, n dense experts -> one Megatron-Core MoE GPTModel checkpoint (streamed).
- `router_init`: router rows (`hidden` from each domain's router inputs, `random`), routing
  fractions of a checkpoint.
- `rewrite`: chunk-by-chunk copy of a checkpoint dropping an expert or replacing tensors.
- `remove`: opt-out, drop one expert's FFN slice and router row.
"""
