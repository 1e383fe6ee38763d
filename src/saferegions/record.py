"""Typed metrics records: a dataclass names the keys its readers use, with their types and ranges (`optional`,
`rate`, `number`), and keeps every other key as written in `extra`, so a metrics file read and written again is
the same JSON. `results` declares one record per stage with these parts."""
from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from . import evidence


class MetricsError(ValueError):
    """A metrics file exists but does not have the shape its stage writes."""


def optional(**bounds):
    """A key the stage may leave out: None when absent, and left out again when written."""
    return field(default=None, metadata={"optional": True, **bounds})


def rate(default=..., **more):
    """A number in [0, 1]; `default` given: the key may be left out."""
    meta = {"lo": 0.0, "hi": 1.0, **more}
    return field(metadata=meta) if default is ... else field(default=default, metadata={"optional": True, **meta})


def number(**more):
    """A number with no upper bound (>= 0 unless `lo` says otherwise)."""
    return field(metadata={"lo": 0.0, "hi": None, **more})


@dataclass(kw_only=True)
class Record:
    """A metrics mapping: typed fields for the keys readers use, `extra` for every other key as written.

    `REST` names a dict field that takes every key not otherwise named (the model / arm / task keys of a
    stage's top level); `REQUIRED_REST` are keys it must hold."""
    extra: dict = field(default_factory=dict, repr=False)
    nulls: frozenset = field(default=frozenset(), repr=False, compare=False)   # optional keys written as null
    REST: ClassVar[str | None] = None
    REQUIRED_REST: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _fields(cls):
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in fields(cls) if f.name not in ("extra", "nulls")]

    @classmethod
    def parse(cls, d, path="", where: str = ""):
        """`d` (a metrics mapping) checked and typed; MetricsError naming `path` and the key otherwise."""
        if not isinstance(d, dict) or not d:
            _fail(path, where, f"expected a non-empty mapping, got {d!r:.80}")
        own = [(f, tp) for f, tp in cls._fields() if f.name != cls.REST]
        missing = [f.name for f, _ in own if not f.metadata.get("optional") and _no_default(f) and f.name not in d]
        if missing:
            _fail(path, where, f"missing key(s) {missing}; has {sorted(d)}")
        names = {f.name for f, _ in own}
        values, nulls = {}, set()
        for f, tp in own:
            if f.name in d:
                values[f.name] = _parse(tp, d[f.name], path, _join(where, f.name), f.metadata)
                if d[f.name] is None and f.metadata.get("optional"):
                    nulls.add(f.name)
        rest = {k: v for k, v in d.items() if k not in names}
        if cls.REST:
            tp = typing.get_type_hints(cls)[cls.REST]
            values[cls.REST] = _parse(tp, rest, path, where, {})
            missing = [k for k in cls.REQUIRED_REST if k not in rest]
            if missing:
                _fail(path, where, f"missing key(s) {missing}; has {sorted(d)}")
            rest = {}
        return cls(**values, extra=rest, nulls=frozenset(nulls))

    def to_dict(self) -> dict:
        """The mapping as the stage writes it (the same JSON `parse` read)."""
        out = {}
        for f, _ in self._fields():
            value = getattr(self, f.name)
            if f.name == self.REST:
                out.update({k: _plain(v) for k, v in value.items()})
            elif value is not None or not f.metadata.get("optional") or f.name in self.nulls:
                out[f.name] = _plain(value)
        return {**out, **self.extra}


def _no_default(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _fail(path, where: str, msg: str):
    raise MetricsError(f"{path}: {where}: {msg}")


def _parse(tp, value, path, where: str, meta: dict):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(inner, value, path, where, meta)
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.parse(value, path, where)
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, where, f"expected a mapping, got {value!r:.80}")
        return {k: _parse(args[1], v, path, _join(where, k), meta) for k, v in value.items()}
    if tp is float or tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                tp is int and not isinstance(value, int)):
            _fail(path, where, f"expected a finite {tp.__name__}, got {value!r:.80}")
        lo, hi = meta.get("lo", None if tp is float else 0), meta.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            _fail(path, where, f"{value} outside [{lo}, {hi}]")
        return value
    if tp is str and not isinstance(value, str):
        _fail(path, where, f"expected a string, got {value!r:.80}")
    if tp is Interval:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            _fail(path, where, f"expected [low, high], got {value!r:.80}")
        return list(value)
    return value   # Any, str


def _plain(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


Interval = list   # [low, high]; a bound is None where undefined


# ---------------------------------------------------------------- shared records


@dataclass(kw_only=True)
class EstimateRecord(Record):
    """An `evidence.Estimate.as_dict()`: n, effect, ci [low, high] (null where undefined), test, p."""
    n: int
    effect: float | None = field(metadata={"lo": None})
    ci: Interval
    test: str | None
    p: float | None = optional()
    ci_one_flip: Interval | None = optional()
    discordant: int | None = optional()

    def estimate(self) -> evidence.Estimate | None:
        """The Estimate back; None where no effect was written."""
        if self.effect is None:
            return None
        floats = lambda pair: tuple(math.nan if c is None else float(c) for c in pair)  # noqa: E731
        return evidence.Estimate(self.n, float(self.effect), floats(self.ci), str(self.test), self.p,
                                 floats(self.ci_one_flip) if self.ci_one_flip else None, self.discordant)


def estimate(record: EstimateRecord | None) -> evidence.Estimate | None:
    return record.estimate() if record is not None else None


@dataclass(kw_only=True)
class Rates(Record):
    """`evaluation.rate_record`: rates over n prompts (each with `<rate>_ci` in `extra`)."""
    n: int | None = optional()
    asr: float | None = rate(None)
    refusal_rate: float | None = rate(None)
    degenerate_rate: float | None = rate(None)
    utility: float | None = optional(lo=None)
    n_utility: int | None = optional()
