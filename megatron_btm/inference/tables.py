"""Pure helpers over evaluation tables ({domain: {row: {"nll", "ppl", "tokens"}}})."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

Table = Mapping[str, Mapping[str, Mapping[str, Any]]]


def mean_ppl(table: Table, row: str, domains: Iterable[str]) -> float:
    """Perplexity of the token-weighted mean NLL of `row` over `domains`; nan if a domain lacks
    the row."""
    nll = tokens = 0.0
    for d in domains:
        cell = table.get(d, {}).get(row)
        if cell is None:
            return float("nan")
        nll += cell["nll"] * cell["tokens"]
        tokens += cell["tokens"]
    return math.exp(nll / tokens) if tokens else float("nan")
