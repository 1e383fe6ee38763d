"""One clear error per bad params value: typed sections built from dicts, and the value checks every section
uses. Separate from `config` so that the method registry and its params (`methods/`, which `config` reads)
validate their own sections without an import cycle."""
from __future__ import annotations

import dataclasses
import types
import typing


class ConfigError(ValueError):
    pass


def _choice(where: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{where}: unknown value {value!r}; valid choices: {', '.join(map(str, valid))}")


def _positive(where: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")


def _fraction(where: str, value) -> None:
    if not 0 < value <= 1:
        raise ConfigError(f"{where}: must be in (0, 1], got {value!r}")


def _subset(where: str, values, valid) -> None:
    for v in values:
        _choice(where, v, valid)
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: duplicate entries in {values!r}")


def _build(cls, raw, where: str):
    """Instantiate a (nested) dataclass from a dict: unknown keys and wrong types are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
