"""Typed, validated params. Every mistake is one clear error, raised before any model loads.

`params.yaml` has one section per concern; each stage reads only the sections named in `STAGE_SECTIONS`
(dvc.yaml lists the same keys, a test checks it). The sections of paper 2's stages are in `config_paper2`, each
method's `identify.<name>` in `methods/params.py`, the value checks in `checks`; none imports torch or a method.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import methods
from .checks import ConfigError, _choice, _coerce, _fraction, _positive, _subset  # noqa: F401  (re-exported)
from .config_paper2 import EsiCfg, SetCfg, SpaCfg, check_esi
from .data import BENIGN_SETS, SAFETY_SETS
from .methods.params import LAYER_MIN_PROMPTS, PROMPT_SETS, QK_MODES  # noqa: F401  (re-exported)
# `.models` (torch, transformers) is imported where it is used, so validating params stays fast: the report stage
# loads no model and spent half its wall time importing torch through this module.

GROUPS = ("matrix", "row", "global")
VARIANTS = ("raw", "refined")
DTYPES = ("auto", "bfloat16", "float32", "float16")
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED = ("none", "fsdp")


@dataclass
class ModelCfg:
    id: str
    offline: str | None = None
    revision: str | None = None   # hub commit (or branch) loaded for `id`; None = the hub's default branch

    def entry(self):
        from .models import ModelEntry
        return ModelEntry(self.id, self.offline, self.revision)


@dataclass
class RunCfg:
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    distributed: str = "none"    # none | fsdp: stages that support it re-launch under torchrun with FSDP2
    nproc: int = 1               # processes (ranks) per node under run.distributed: fsdp

    def __post_init__(self):
        _choice("run.device", self.device, DEVICES)
        _choice("run.dtype", self.dtype, DTYPES)
        _choice("run.distributed", self.distributed, DISTRIBUTED)
        _positive("run.nproc", self.nproc)


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


# HarmBench's published text-behavior classifier (answers "Yes"/"No"). Its commit hash is not known offline, so
# the revision is the branch `main`; pin the hash here once it has been read from the hub.
HARMBENCH_CLASSIFIER = ModelCfg("cais/HarmBench-Llama-2-13b-cls", revision="main")


@dataclass
class JudgesCfg:
    keyword: KeywordCfg = field(default_factory=KeywordCfg)
    learned: LearnedCfg = field(default_factory=LearnedCfg)
    llama_guard: ModelCfg | None = None
    harmbench: ModelCfg = field(default_factory=lambda: dataclasses.replace(HARMBENCH_CLASSIFIER))


class JudgeKind(str, enum.Enum):
    """Every judge `judges.get` builds (its params live under `judges.<value>`)."""
    KEYWORD = "keyword"
    LEARNED = "learned"           # trained by the baseline stage
    LLAMA_GUARD = "llama_guard"
    HARMBENCH = "harmbench"


# The learned judge's head is an output of the baseline stage, which the evaluating stages do not depend on.
EVALUATION_JUDGES = tuple(k.value for k in JudgeKind if k is not JudgeKind.LEARNED)


@dataclass
class EvaluationCfg:
    """The judge every evaluating stage classifies responses with (`judges.get(evaluation.judge, cfg)`)."""
    judge: str = JudgeKind.KEYWORD.value

    def __post_init__(self):
        _choice("evaluation.judge", self.judge, EVALUATION_JUDGES)


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


# Dataclass defaults are the paper-scale values of docs/methods.md; params.yaml scales them down for the CPU budget.

@dataclass
class CalibrateCfg:
    """Calibration examples = (ident prompt, the model's own response: a refusal for the safety sets), generated
    once per model and shared by every method (docs/methods.md §2, shared conventions)."""
    datasets: list[str] = field(default_factory=lambda: list(SAFETY_SETS))
    utility_set: str = "alpaca"
    n: int = 128                 # examples per dataset (Wei et al.'s nsamples)
    max_new_tokens: int = 128    # docs/methods.md §2: 128 (UNKNOWN for paper 1)
    batch_size: int = 16
    system_prompt: str | None = None
    min_distinct: float = 0.5    # a set whose greedy responses have fewer distinct texts than min_distinct * n
                                 # (e.g. one refusal sentence) gets its repeats re-answered by sampling
    temperature: float = 1.0     # of that sampling (seeded with run.seed)
    n_utility_eval: int = 32     # held-out (eval-split) utility prompts answered greedily once: the identify
                                 # stage's p/q sweep scores utility on them (>= 32)
    redraws: int = 4             # safety sets keep refusals only: a greedy response that does not refuse (complied
                                 # or degenerate) is re-drawn by seeded sampling at most this many times
    min_kept: int = 32           # a safety set with fewer refusals than this keeps its first non-refusals up to it
                                 # (counted as filled in metrics.json), so every method has examples to score

    def __post_init__(self):
        _subset("calibrate.datasets", self.datasets, SAFETY_SETS)
        _choice("calibrate.utility_set", self.utility_set, BENIGN_SETS)
        for k in ("n", "max_new_tokens", "batch_size", "temperature", "n_utility_eval", "min_kept"):
            _positive(f"calibrate.{k}", getattr(self, k))
        _fraction("calibrate.min_distinct", self.min_distinct)
        if self.redraws < 0:
            raise ConfigError(f"calibrate.redraws: must be >= 0, got {self.redraws!r}")
        if self.min_kept > self.n:
            raise ConfigError(f"calibrate.min_kept ({self.min_kept}) exceeds calibrate.n ({self.n}): a set cannot "
                              "keep more examples than it asks")


@dataclass
class _IdentifyCommon:
    """The `identify` keys every method shares; `IdentifyCfg` adds one sub-section per registered method."""
    models: list[str] = field(default_factory=lambda: ["aligned"])   # roles; the size axis adds more
    methods: list[str] = field(default_factory=lambda: list(methods.REGISTRY))
    q: float = 0.02              # top-q of the safety scores (docs/methods.md §2.1)
    p: float = 0.04              # top-p of the utility scores, subtracted (Wei et al.'s p = 0.04, q = 0.02)
    group: str = "matrix"
    batch_size: int = 8
    max_length: int = 512
    pq_grid_q: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03, 0.05])   # SNIP/Wanda p/q sweep
    pq_grid_p: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.04, 0.06, 0.08])   # ([] = none)
    pq_dataset: str = "advbench"     # the dataset whose refined region the sweep ablates
    min_utility_ratio: float = 0.9   # the rule: ablating the refined region keeps utility >= this x intact
    split_half_datasets: list[str] | None = None   # raw regions from each half of these sets' examples
                                                   # (overlap noise ceiling); None = every identified set

    def __post_init__(self):
        _subset("identify.methods", self.methods, tuple(methods.REGISTRY))
        _fraction("identify.q", self.q)
        _fraction("identify.p", self.p)
        for k in ("pq_grid_q", "pq_grid_p"):
            for v in getattr(self, k):
                _fraction(f"identify.{k}", v)
        _choice("identify.pq_dataset", self.pq_dataset, SAFETY_SETS)
        _fraction("identify.min_utility_ratio", self.min_utility_ratio)
        if self.split_half_datasets is not None:
            _subset("identify.split_half_datasets", self.split_half_datasets, SAFETY_SETS)
        _choice("identify.group", self.group, GROUPS)
        _positive("identify.batch_size", self.batch_size)
        _positive("identify.max_length", self.max_length)

    def datasets(self, method: str, all_datasets: list[str]) -> list[str]:
        """The identification datasets `method` runs on: its own `datasets` key, else every calibrated one."""
        own = getattr(self, method).datasets
        return list(all_datasets) if own is None else list(own)


_IDENTIFY_CLASSES: dict[tuple, type] = {}


def _identify_cls() -> type:
    """The `identify` section's dataclass for the methods registered now: the shared keys plus
    `identify.<name>` (the method's own config class) per method. Rebuilt when a method is registered."""
    key = tuple((m.name, m.config) for m in methods.REGISTRY.values())
    if key not in _IDENTIFY_CLASSES:
        own = [(name, cls, field(default_factory=cls)) for name, cls in key]
        _IDENTIFY_CLASSES[key] = dataclasses.make_dataclass("IdentifyCfg", own, bases=(_IdentifyCommon,),
                                                            namespace={"__module__": __name__})
    return _IDENTIFY_CLASSES[key]


def __getattr__(name: str):
    """`config.IdentifyCfg` and `config.METHODS` (the valid method names) follow the method registry."""
    if name == "IdentifyCfg":
        return _identify_cls()
    if name == "METHODS":
        return tuple(methods.REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PowerCfg:
    """The pre-registered power calculation of the paired comparisons (docs/methods.md, "Power")."""
    effect: float = 0.10        # effect worth detecting: the region claim's threshold
    discordance: float = 0.20   # discordant-pair rate p10 + p01 of region vs random (results/validate/metrics.json:
                                # 160 of 800 prompts, wanda/advbench, 8 tokens)
    power: float = 0.80
    alpha: float = 0.05

    def __post_init__(self):
        for k in ("discordance", "power", "alpha"):
            _fraction(f"validate.power.{k}", getattr(self, k))
        if not 0 < self.effect <= self.discordance:
            raise ConfigError(f"validate.power.effect: must be in (0, discordance {self.discordance}], "
                              f"got {self.effect}")


@dataclass
class RefusalDirectionCfg:
    """The positive control: ablating the refusal direction (Arditi et al. 2024; methods/refusal_direction.py)."""
    n: int = 128                 # harmful and harmless identification-split prompts each (Arditi et al.: 128)
    harmless_set: str = "alpaca"
    layers: list[float] = field(default_factory=lambda: [0.375, 0.5, 0.625])   # candidate blocks, fractions of
                                 # depth (the reference's selected layers lie at 0.375-0.625 of depth)
    positions: list[int] = field(default_factory=lambda: [-1])   # candidate post-instruction positions
    n_select: int = 32           # held-out harmful prompts (identification split) that pick the candidate

    def __post_init__(self):
        for k in ("n", "n_select"):
            _positive(f"validate.direction.{k}", getattr(self, k))
        _choice("validate.direction.harmless_set", self.harmless_set, BENIGN_SETS)
        if not self.layers or any(not 0 <= f <= 1 for f in self.layers):
            raise ConfigError(f"validate.direction.layers: fractions of depth in [0, 1], got {self.layers}")
        if not self.positions or any(p >= 0 for p in self.positions):
            raise ConfigError(f"validate.direction.positions: negative positions, got {self.positions}")


@dataclass
class ValidateCfg:
    datasets: list[str] = field(default_factory=lambda: list(SAFETY_SETS))   # regions ablated, per method
    variant: str = "refined"     # which region of each dataset is ablated
    eval_sets: list[str] = field(default_factory=lambda: list(SAFETY_SETS))  # held-out harmful prompt pool
    n_eval: int | None = 18      # eval prompts per set; None = from the power calculation (`power`)
    n_utility: int = 100         # Alpaca eval prompts for the utility score
    max_new_tokens: int = 64
    batch_size: int = 16
    layer_alpha: float = 0.0     # layer regions are scaled by this (0 = the blocks' projections are off)
    random_mode: str = "per_matrix_matched"
    methods: list[str] | None = None   # methods whose regions are validated (None = every identify method)
    random_draws: int = 3        # random regions of the primary region (first method x first dataset); others: 1
    matched_bins: int = 10       # utility-importance quantile bins of the importance-matched control
    rejudge_max_new_tokens: int = 128   # the primary comparisons' discordant pairs generated again at this length
                                        # and judged again (`rejudge`); 0 = off
    power: PowerCfg = field(default_factory=PowerCfg)
    direction: RefusalDirectionCfg = field(default_factory=RefusalDirectionCfg)

    def __post_init__(self):
        if self.methods is not None:
            _subset("validate.methods", self.methods, tuple(methods.REGISTRY))
        _subset("validate.datasets", self.datasets, SAFETY_SETS)
        _subset("validate.eval_sets", self.eval_sets, SAFETY_SETS)
        _choice("validate.variant", self.variant, VARIANTS)
        _choice("validate.random_mode", self.random_mode, ("per_matrix_matched", "global_uniform"))
        for k in ("n_utility", "max_new_tokens", "batch_size", "random_draws", "matched_bins"):
            _positive(f"validate.{k}", getattr(self, k))
        if self.n_eval is not None:
            _positive("validate.n_eval", self.n_eval)
        if self.layer_alpha < 0:
            raise ConfigError(f"validate.layer_alpha: must be >= 0, got {self.layer_alpha}")
        if self.rejudge_max_new_tokens and self.rejudge_max_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"validate.rejudge_max_new_tokens: {self.rejudge_max_new_tokens} must exceed "
                              f"validate.max_new_tokens ({self.max_new_tokens}), or be 0 (off)")


@dataclass
class BootstrapCfg:
    """Prompt bootstrap of the IoU (resample a dataset's calibration examples, re-identify, recompute)."""
    methods: list[str] = field(default_factory=lambda: list(methods.resamplable()))   # per-example scores only
    datasets: list[str] | None = None   # None = every dataset the method identified on
    n_resamples: int = 200
    seed: int = 0

    def __post_init__(self):
        _subset("overlap.bootstrap.methods", self.methods, methods.resamplable())
        if self.datasets is not None:
            _subset("overlap.bootstrap.datasets", self.datasets, SAFETY_SETS)
            if len(self.datasets) < 2:
                raise ConfigError("overlap.bootstrap.datasets: needs at least two datasets (one pair)")
        if self.n_resamples < 0:
            raise ConfigError(f"overlap.bootstrap.n_resamples: must be >= 0, got {self.n_resamples}")


@dataclass
class OverlapCfg:
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    scope: str = "both"          # global | per_matrix | both (docs/methods.md §3.3); metrics.json uses global
    n_orders: int = 20           # random dataset orderings for the multi-way convergence curve (§3.3)
    seed: int = 0
    chance_draws: int = 10000    # simulated draws of random layer sets (layer-unit chance, §3.4)
    bootstrap: BootstrapCfg = field(default_factory=BootstrapCfg)

    def __post_init__(self):
        _subset("overlap.variants", self.variants, VARIANTS)
        if not self.variants:
            raise ConfigError("overlap.variants: give at least one of raw, refined")
        _choice("overlap.scope", self.scope, ("global", "per_matrix", "both"))
        for k in ("n_orders", "chance_draws"):
            _positive(f"overlap.{k}", getattr(self, k))

    def scopes(self) -> list[str]:
        return ["global", "per_matrix"] if self.scope == "both" else [self.scope]


SECTIONS = {"run": RunCfg, "models": dict[str, ModelCfg], "data": DataCfg, "judges": JudgesCfg,
            "evaluation": EvaluationCfg,
            "baseline": BaselineCfg, "calibrate": CalibrateCfg, "identify": _identify_cls(),
            "validate": ValidateCfg, "overlap": OverlapCfg, "esi": EsiCfg, "set": SetCfg, "spa": SpaCfg}
# A "section.key" entry passes one sub-section only (dvc.yaml lists the same key).
# What an evaluating stage reads of `judges`: every judge `evaluation.judge` may name, but not the learned judge
# (the baseline stage's own), so retraining it re-runs only the stages that use it. DVC lists the same keys, so
# every params file names each of them (`llama_guard: null` where there is none).
EVALUATION = ["judges.keyword", "judges.llama_guard", "judges.harmbench", "evaluation"]
STAGE_SECTIONS = {
    "data": ["run", "data"],
    "models": ["models"],
    "baseline": ["run", "models", "judges", "evaluation", "baseline"],
    "calibrate": ["run", "models", *EVALUATION, "calibrate"],
    "identify": ["run", "models", *EVALUATION, "calibrate", "identify"],
    "validate": ["run", "models", *EVALUATION, "calibrate", "identify", "validate"],
    "esi": ["run", "models", "judges", "evaluation", "esi"],
    "set": ["run", "models", *EVALUATION, "set"],
    "spa": ["run", "models", *EVALUATION, "spa"],
    "overlap": ["run", "models", "calibrate", "identify", "overlap"],
}
# The report prints every section's deviations from the paper-scale defaults, so it reads them all; sections
# a profile leaves out are skipped (stage_params), and their stages are reported as "not run".
STAGE_SECTIONS["report"] = ["run", "models", "data", "judges", "evaluation", "baseline", "calibrate", "identify",
                            "validate", "overlap", "esi", "set", "spa"]


def _check_models(models: dict[str, ModelCfg]) -> None:
    from importlib import resources   # = models.mirrors(), without importing torch
    valid = sorted(json.loads(resources.files("saferegions").joinpath("registry/mirrors.json").read_text()))
    for role, m in models.items():
        if m.offline and not m.offline.startswith("tiny-"):
            _choice(f"models.{role}.offline", m.offline, valid + ["tiny-<family>"])


def parse(raw: dict) -> types.SimpleNamespace:
    """Validate the given sections (all of params.yaml, or one stage's subset) and cross-check names."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown params section(s) {sorted(unknown)}; valid: {sorted(SECTIONS)}")
    sections = {**SECTIONS, "identify": _identify_cls()}    # with every method registered by now
    out = {name: _coerce(tp, raw[name], name) for name, tp in sections.items() if name in raw}
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
        if "identify" in out:
            _subset("identify.models", cfg.identify.models, roles)
        for stage in ("set", "spa"):
            if stage in out:
                _choice(f"{stage}.model", getattr(cfg, stage).model, roles)
    if "run" in out and "identify" in out and cfg.run.distributed == "fsdp":
        unsupported = [m for m in cfg.identify.methods if m not in methods.sharded()]
        if unsupported:
            raise ConfigError(f"identify.methods: {unsupported} have no sharded implementation; under "
                              f"run.distributed: fsdp the identify stage runs {list(methods.sharded())} only")
    if "identify" in out and "calibrate" in out:
        for m in methods.REGISTRY:
            own = getattr(cfg.identify, m).datasets
            if own is not None:
                _subset(f"identify.{m}.datasets", own, cfg.calibrate.datasets)
    if "validate" in out and "calibrate" in out:
        _subset("validate.datasets", cfg.validate.datasets, cfg.calibrate.datasets)
        if "identify" in out:    # every validated region must have been identified by every validated method
            if cfg.validate.methods is not None:
                _subset("validate.methods", cfg.validate.methods, cfg.identify.methods)
            for m in (cfg.identify.methods if cfg.validate.methods is None else cfg.validate.methods):
                _subset(f"validate.datasets (identified by {m})", cfg.validate.datasets,
                        cfg.identify.datasets(m, cfg.calibrate.datasets))
    if "overlap" in out and "identify" in out:   # bootstrapped methods must have been identified
        for m in cfg.overlap.bootstrap.methods:
            if m not in cfg.identify.methods:
                raise ConfigError(f"overlap.bootstrap.methods: {m!r} is not in identify.methods")
            if cfg.overlap.bootstrap.datasets is not None and "calibrate" in out:
                _subset(f"overlap.bootstrap.datasets (identified by {m})", cfg.overlap.bootstrap.datasets,
                        cfg.identify.datasets(m, cfg.calibrate.datasets))
    if "esi" in out:
        check_esi(cfg)
    if "evaluation" in out and "judges" in out and cfg.evaluation.judge == JudgeKind.LLAMA_GUARD \
            and cfg.judges.llama_guard is None:
        raise ConfigError("evaluation.judge: 'llama_guard' needs judges.llama_guard (a Llama-Guard-style model: "
                          "{id, offline, revision})")
    return cfg


def deviations(section, name: str) -> list[dict]:
    """Keys of a section whose value differs from the dataclass default (the paper-scale value, docs/methods.md):
    the executed notebooks print these beside each CPU reduction."""
    rows = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(default):
            rows += deviations(value, f"{name}.{f.name}")
            continue
        if value != default:    # also an optional sub-section set where the default is None (judges.llama_guard)
            rows.append({"param": f"{name}.{f.name}", "this run": value, "paper-scale default": default})
    return rows


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
    out: dict = {}
    for key in STAGE_SECTIONS[stage]:
        section, _, sub = key.partition(".")
        if section not in raw:
            continue
        if sub:
            if sub in (raw[section] or {}):
                out.setdefault(section, {})[sub] = raw[section][sub]
        else:
            out[section] = raw[section]
    return out
