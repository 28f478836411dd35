"""Config values from YAML files and `--set KEY=VALUE`: parsed as a user means them, checked
against the dataclass field annotations, every error one line naming the key, value and type.

PyYAML implements YAML 1.1, where `1e-3`, `3e-4` and `1E5` are *strings* (its float needs a dot);
`yaml_loader()` adds the YAML 1.2 float forms, so a learning rate reads as a number everywhere.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_btm.errors import ConfigError, InputNotFound

# YAML 1.2 floats PyYAML's 1.1 resolver misses: an exponent without a dot (1e-3, 3E+4, -2e5)
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (a subclass: the global loader is unchanged)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    text = f"{where}{problem}" + (f" ({context})" if context else "")
    return " ".join(text.split())


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python (1e-3 is a float); a syntax error is one ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(e)})") from None


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: {what} not found" if not path.exists()
                            else f"{path}: is a folder, not a {what}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a", "b", "c"], VALUE parsed as YAML: 3e-4 -> 0.0003, true, [1, 2])."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. model.num_layers=4)")
    return [p.strip() for p in parts], parse_yaml(raw, f"--set {item!r}")


def apply_overrides(data: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """Apply each `a.b.c=value` (see parse_override) to the nested dict `data`, in place."""
    for item in items or []:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section "
                                  f"(it is {node!r})")
        node[parts[-1]] = value
    return data


# --- field types -------------------------------------------------------------------------------

_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_INT = re.compile(r"^[-+]?[0-9][0-9_]*$")
_WHAT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(tp: type, value: Any) -> Any:
    """`value` as `tp` (bool, int, float or str) the way a user means it; raises TypeError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _WORDS:
            return _WORDS[value.strip().lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e4 steps
        if isinstance(value, str) and _INT.match(value.strip()):
            return int(value.strip().replace("_", ""))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a name such as 2020
    raise TypeError(_WHAT[tp])


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check/convert `value` against a field annotation; ConfigError names key, value and type.

    Handles bool/int/float/str, `X | None` and list/tuple of those; other annotations (nested
    dataclasses, dicts, Literal, Any) pass through to the dataclass's own checks.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        if len(args) == 1:
            return coerce(args[0], value, key)
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        item = args[0] if args and (origin is list or args[-1] is Ellipsis or len(args) == 1) \
            else None
        if item in _WHAT:
            value = [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(value) if origin is tuple else list(value)
    if hint in _WHAT and value is not None:
        try:
            return _convert(hint, value)
        except TypeError as e:
            raise ConfigError(f"{key}={value!r}: expected {e}") from None
    return value


def field_hints(cls) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass ({} where annotations do not resolve)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def check_fields(obj: Any, where: str) -> None:
    """Coerce/check every simple-typed field of a dataclass instance in place (__post_init__)."""
    for name, hint in field_hints(type(obj)).items():
        value = getattr(obj, name)
        new = coerce(hint, value, f"{where}: {name}")
        if new is not value:
            object.__setattr__(obj, name, new)


def from_dict(cls, data: Any, where: str):
    """`cls(**data)` with values coerced to the field types; refuses a non-mapping, unknown keys,
    missing required keys and ill-typed values, naming them (`where` is the section name)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    missing = sorted(f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    hints = field_hints(cls)
    values = {k: coerce(hints[k], v, f"{where}: {k}") if k in hints else v for k, v in data.items()}
    return cls(**values)
