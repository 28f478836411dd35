"""Apply a mapping table (`hf.mapping`) to whole state dicts: Megatron -> HF (export) and the
per-tensor plan of HF -> Megatron (import). `cfg` is a GPTConfig (or anything with its fields).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping

from megatron_btm.hf.mapping import ALIASES, LAYERS, Rule, Table, to_hf, to_megatron

if TYPE_CHECKING:
    import torch


def _candidates(rule: Rule, layer: bool) -> list[str]:
    names = [rule.megatron] + ([ALIASES[rule.megatron]] if rule.megatron in ALIASES else [])
    return [LAYERS + n if layer else n for n in names]


def required_keys(available: Mapping[str, Any] | set[str], cfg, table: Table) -> list[str]:
    """The Megatron keys an export reads, resolving which layer-norm naming the checkpoint uses."""
    glob, layers = table.rules(cfg)
    keys = []
    for rule, layer in [(r, False) for r in glob] + [(r, True) for r in layers + list(table.experts)]:
        cands = _candidates(rule, layer)
        found = [c for c in cands if c in available]
        if not found:
            raise ValueError(f"checkpoint has none of {cands} (needed for HF {rule.hf[0]}); "
                             f"not a {table.family} checkpoint of our layout?")
        keys.append(found[0])
    return keys


def megatron_to_hf(state: Mapping[str, torch.Tensor], cfg, table: Table, *, vocab_size: int,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Megatron global tensors (layers stacked on axis 0) -> the HF family's state dict.

    `vocab_size` rows of the (padded) embedding/output are kept. Tensors come out contiguous in
    `dtype` (default float32; converted after the exact reshapes, so no double rounding).
    """
    import torch
    dtype = torch.float32 if dtype is None else dtype
    glob, layers = table.rules(cfg)
    out: dict[str, torch.Tensor] = {}

    def put(rule: Rule, tensors: list[torch.Tensor], i: int | None = None) -> None:
        for key, t in zip(rule.hf, tensors):
            out[key.format(i=i)] = t.to(dtype).contiguous()

    def get(rule: Rule, layer: bool) -> torch.Tensor:
        return next(state[c] for c in _candidates(rule, layer) if c in state)

    for rule in glob:
        put(rule, to_hf(rule.kind, get(rule, False), cfg, vocab_size))
    stacked = [(rule, get(rule, True)) for rule in layers]
    for rule, t in stacked:
        if t.shape[0] != cfg.num_layers:
            raise ValueError(f"{LAYERS}{rule.megatron}: leading (layer) axis is {t.shape[0]}, "
                             f"expected num_layers={cfg.num_layers}")
    experts = [(rule, get(rule, True)) for rule in table.experts]
    n = getattr(cfg, "num_moe_experts", None) or 0
    for rule, t in experts:
        if tuple(t.shape[:2]) != (cfg.num_layers, n):
            raise ValueError(f"{LAYERS}{rule.megatron}: leading (layer, expert) axes are "
                             f"{list(t.shape[:2])}, expected [{cfg.num_layers}, {n}]")
    for i in range(cfg.num_layers):
        for rule, t in stacked:
            put(rule, to_hf(rule.kind, t[i], cfg, vocab_size), i)
        for e in range(n):
            for rule, t in experts:
                for key, x in zip(rule.hf, to_hf(rule.kind, t[i, e], cfg, vocab_size)):
                    out[key.format(i=i, e=e)] = x.to(dtype).contiguous()
    return out


def import_plan(cfg, table: Table) -> Iterator[tuple[str, Rule, int | tuple[int, int] | None]]:
    """(Megatron key, rule, layer or None) of every tensor an import writes, in write order;
    MoE expert rules give (layer, expert) instead of the layer."""
    glob, layers = table.rules(cfg)
    for rule in glob:
        yield rule.megatron, rule, None
    for rule in layers:
        for i in range(cfg.num_layers):
            yield LAYERS + rule.megatron, rule, i
    n = getattr(cfg, "num_moe_experts", None) or 0
    for rule in table.experts:
        for i in range(cfg.num_layers):
            for e in range(n):
                yield LAYERS + rule.megatron, rule, (i, e)


def hf_keys(rule: Rule, layer: int | tuple[int, int] | None) -> list[str]:
    if isinstance(layer, tuple):
        return [k.format(i=layer[0], e=layer[1]) for k in rule.hf]
    return [k.format(i=layer) for k in rule.hf]


def stack_index(cfg, layer: int | tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, leading axes) of one import-plan slice in its stacked Megatron tensor."""
    if isinstance(layer, tuple):
        return layer, (cfg.num_layers, cfg.num_moe_experts)
    return (layer,), (cfg.num_layers,)


def convert_one(rule: Rule, hf: list[torch.Tensor], cfg, padded_vocab: int) -> torch.Tensor:
    return to_megatron(rule.kind, hf, cfg, padded_vocab).contiguous()
