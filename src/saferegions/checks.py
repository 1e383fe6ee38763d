"""One clear error per bad params value. Separate from `config` so that the method registry
(`methods/__init__.py`, which `config` reads) can validate its own sections without an import cycle."""
from __future__ import annotations


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
