"""Expert ids and domain names: the one rule every entry point checks.

Ids and domains become folder names (`experts/<id>/`), SLURM job names and command-line
arguments, so nothing that could escape a path (`/`, `..`) or reach a shell (`$`, `;`, `|`,
backticks, spaces, quotes) is accepted.
"""
from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = ("1-128 characters from [A-Za-z0-9._-], starting with a letter or digit, "
             "and not containing '..'")

# The seed LM is recorded under this id (and domain); no expert may take it.
SEED_ID = "seed"
RESERVED_IDS = frozenset({SEED_ID})


def check_name(value: object, what: str = "name") -> str:
    """`value` if it is a valid id/domain name; else a ValueError naming it and the rule."""
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r}: must be a string ({NAME_RULE})")
    if not NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not allowed: {NAME_RULE}")
    return value


def check_expert_id(value: object) -> str:
    """An id for a new expert: a valid name that is not reserved for the seed."""
    check_name(value, "expert id")
    if value in RESERVED_IDS:
        raise ValueError(f"expert id {value!r} is reserved for the seed LM; choose another id")
    return value  # type: ignore[return-value]


def check_domain(value: object) -> str:
    """A domain of a new expert (the seed's pseudo-domain 'seed' is reserved)."""
    check_name(value, "domain")
    if value in RESERVED_IDS:
        raise ValueError(f"domain {value!r} is reserved for the seed LM; choose another domain")
    return value  # type: ignore[return-value]
