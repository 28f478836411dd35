"""Tensor and object names of dense and MoE torch_dist checkpoints (see docs/MOE.md).

Layers are one key with the layer as axis 0 (Megatron's sharded layout); in an MoE checkpoint
the expert index is axis 1 of every expert tensor and of the router:

    dense  decoder.layers.mlp.linear_fc1.weight                 [L, F, H]
    MoE    decoder.layers.mlp.experts.experts.linear_fc1.weight [L, n, F, H]
           decoder.layers.mlp.router.weight                     [L, n, H]  (+ router.bias [L, n])

The pre-MLP norm keeps its dense name (`decoder.layers.mlp.linear_fc1.layer_norm_*`) in both,
so it is averaged like every other shared tensor.
"""
from __future__ import annotations

import re

DENSE_MLP = "decoder.layers.mlp."
EXPERTS = "decoder.layers.mlp.experts.experts."
ROUTER = "decoder.layers.mlp.router."
ROUTER_WEIGHT = ROUTER + "weight"
ROUTER_BIAS = ROUTER + "bias"
EXPERT_AXIS = 1

_DENSE_MLP_TENSOR = re.compile(r"^decoder\.layers\.mlp\.linear_fc[12]\.(weight|bias)$")
_DENSE_MLP_OBJECT = re.compile(r"^decoder\.layers\.mlp\.(linear_fc[12])\._extra_state/shard_(\d+)_(\d+)$")
_EXPERT_OBJECT = re.compile(
    r"^decoder\.layers\.mlp\.experts\.experts\.(linear_fc[12])\._extra_state/shard_(\d+)\.(\d+)_(\d+)\.(\d+)$")


def is_dense_mlp_tensor(key: str) -> bool:
    """A dense expert's own MLP weight or bias (not the pre-MLP norm `linear_fc1.layer_norm_*`)."""
    return bool(_DENSE_MLP_TENSOR.match(key))


def is_dense_mlp_object(key: str) -> bool:
    return bool(_DENSE_MLP_OBJECT.match(key))


def expert_key(dense_key: str) -> str:
    """decoder.layers.mlp.linear_fc1.weight -> decoder.layers.mlp.experts.experts.linear_fc1.weight"""
    return EXPERTS + dense_key[len(DENSE_MLP):]


def expert_object_key(dense_key: str, expert: int, num_experts: int) -> str:
    """A dense MLP linear's `_extra_state/shard_<l>_<L>` as MoE expert `expert` of `num_experts`."""
    m = _DENSE_MLP_OBJECT.match(dense_key)
    if not m:
        raise ValueError(f"{dense_key!r}: not a dense MLP object key")
    name, layer, layers = m.groups()
    return f"{EXPERTS}{name}._extra_state/shard_{layer}.{expert}_{layers}.{num_experts}"


def has_expert_axis(key: str) -> bool:
    """Tensors indexed by expert on axis 1: the experts' weights and biases and the router's."""
    return key.startswith((EXPERTS, ROUTER))


def renumber_expert_object(key: str, removed: int) -> str | None:
    """An expert object key after dropping expert `removed`: None for its own objects, the
    renumbered key for later experts, `key` itself for any other object."""
    m = _EXPERT_OBJECT.match(key)
    if not m:
        return key
    name, layer, expert, layers, n = m.group(1), m.group(2), int(m.group(3)), m.group(4), int(m.group(5))
    if expert == removed:
        return None
    expert -= expert > removed
    return f"{EXPERTS}{name}._extra_state/shard_{layer}.{expert}_{layers}.{n - 1}"


def moe_model_config(dense: dict, *, num_experts: int, topk: int) -> dict:
    """The MoE model_config of n dense experts of architecture `dense` (a meta.json model_config):
    every dense field, num_moe_experts = n, each expert as wide as the dense MLP."""
    import dataclasses

    from megatron_btm.megatron.model import GPTConfig
    cfg = GPTConfig.from_dict(dense)
    if cfg.num_moe_experts:
        raise ValueError(f"the experts are already mixture-of-experts models (num_moe_experts="
                         f"{cfg.num_moe_experts}); merge-moe merges dense experts")
    return dataclasses.replace(cfg, num_moe_experts=num_experts, moe_router_topk=topk).to_dict()
