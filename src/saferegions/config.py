"""Typed, validated params. Every mistake is one clear error, raised before any model loads.

`params.yaml` has one section per concern; each stage reads only the sections named in `STAGE_SECTIONS`
(dvc.yaml lists the same keys, a test checks it).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import BENIGN_SETS, SAFETY_SETS
from .models import ModelEntry, mirrors

PROMPT_SETS = SAFETY_SETS + BENIGN_SETS
DTYPES = ("auto", "bfloat16", "float32", "float16")
DEVICES = ("auto", "cpu", "cuda")


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


@dataclass
class ModelCfg:
    id: str
    offline: str | None = None

    def entry(self) -> ModelEntry:
        return ModelEntry(self.id, self.offline)


@dataclass
class RunCfg:
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        _choice("run.device", self.device, DEVICES)
        _choice("run.dtype", self.dtype, DTYPES)


@dataclass
class DataCfg:
    ident_size: int = 128
    eval_min: int = 18
    alpaca_max: int = 2000
    gsm8k_max: int = 500

    def __post_init__(self):
        for k in ("ident_size", "eval_min", "alpaca_max", "gsm8k_max"):
            _positive(f"data.{k}", getattr(self, k))


@dataclass
class KeywordCfg:
    window: int = 200
    min_words: int = 0
    phrases: list[str] = field(default_factory=list)


@dataclass
class LearnedCfg:
    encoder: str = "encoder"
    max_train: int = 2000
    heldout_frac: float = 0.2
    max_length: int = 128
    batch_size: int = 64

    def __post_init__(self):
        _fraction("judges.learned.heldout_frac", self.heldout_frac)
        _positive("judges.learned.max_train", self.max_train)


@dataclass
class JudgesCfg:
    keyword: KeywordCfg = field(default_factory=KeywordCfg)
    learned: LearnedCfg = field(default_factory=LearnedCfg)
    llama_guard: ModelCfg | None = None


@dataclass
class BaselineCfg:
    models: list[str] = field(default_factory=lambda: ["aligned", "unaligned"])
    datasets: list[str] = field(default_factory=lambda: list(PROMPT_SETS))
    n_prompts: int = 16
    max_new_tokens: int = 48
    batch_size: int = 16
    system_prompt: str | None = None

    def __post_init__(self):
        for d in self.datasets:
            _choice("baseline.datasets", d, PROMPT_SETS)
        for k in ("n_prompts", "max_new_tokens", "batch_size"):
            _positive(f"baseline.{k}", getattr(self, k))


SECTIONS = {"run": RunCfg, "models": dict[str, ModelCfg], "data": DataCfg, "judges": JudgesCfg,
            "baseline": BaselineCfg}
STAGE_SECTIONS = {
    "data": ["run", "data"],
    "models": ["models"],
    "baseline": ["run", "models", "judges", "baseline"],
}


def _check_models(models: dict[str, ModelCfg]) -> None:
    valid = sorted(mirrors())
    for role, m in models.items():
        if m.offline and not m.offline.startswith("tiny-"):
            _choice(f"models.{role}.offline", m.offline, valid + ["tiny-<family>"])


def parse(raw: dict) -> types.SimpleNamespace:
    """Validate the given sections (all of params.yaml, or one stage's subset) and cross-check names."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown params section(s) {sorted(unknown)}; valid: {sorted(SECTIONS)}")
    out = {name: _coerce(tp, raw[name], name) for name, tp in SECTIONS.items() if name in raw}
    cfg = types.SimpleNamespace(**out)
    models = out.get("models")
    if models is not None:
        _check_models(models)
        roles = sorted(models)
        if "baseline" in out:
            for m in cfg.baseline.models:
                _choice("baseline.models", m, roles)
        if "judges" in out:
            _choice("judges.learned.encoder", cfg.judges.learned.encoder, roles)
    return cfg


def load(path: str | Path = "params.yaml") -> types.SimpleNamespace:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    return parse(raw)


def stage_params(stage: str, path: str | Path = "params.yaml") -> dict:
    """The raw sections one stage reads, validated as a whole file first."""
    _choice("stage", stage, sorted(STAGE_SECTIONS))
    load(path)
    raw = yaml.safe_load(Path(path).read_text())
    return {k: raw[k] for k in STAGE_SECTIONS[stage] if k in raw}
