"""The one contract for every stage's results/<stage>/metrics.json: a dataclass per stage.

Stages write their metrics through `save` (the dict is checked against the stage's dataclass before a byte is
written); the report and the README read them through `load_results`, as typed records. A record names the
keys its readers use, with their types and ranges; every other key the stage writes is kept as written in
`extra`, so a metrics file read and written again is the same JSON.

A stage that did not run (switched off by the profile, or not built yet) reads as None ("not run"); a metrics
file that exists but does not have the shape its stage promises is an error naming the file and the key,
because a summary that silently skipped a broken number would misstate what the run found.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import evidence
from .io import write_json
from .record import (EstimateRecord, Interval, MetricsError, Rates, Record, estimate, number,  # noqa: F401
                     optional, rate)

# Pipeline order of the stages whose outputs the report reads (the report itself excluded).
STAGES = ("data", "models", "baseline", "calibrate", "identify", "validate", "overlap", "esi", "set", "spa")
MATRIX_STAGES = ("calibrate", "identify")   # results/<stage>/<item>/...
NOT_RUN = "not run"


# ---------------------------------------------------------------- one record per stage


@dataclass(kw_only=True)
class DataMetrics(Record):
    sets: dict[str, dict[str, int]]


@dataclass(kw_only=True)
class ModelRow(Record):
    family: str | None = optional()
    id: str | None = optional()


@dataclass(kw_only=True)
class ModelsMetrics(Record):
    models: dict[str, ModelRow]


@dataclass(kw_only=True)
class JudgeSummary(Record):
    heldout_accuracy: float | None = rate(None)


@dataclass(kw_only=True)
class BaselineMetrics(Record):
    models: dict[str, dict[str, Rates]]
    comparison: dict[str, EstimateRecord] | None = optional()
    judge: JudgeSummary | None = optional()


@dataclass(kw_only=True)
class CalibrationSet(Rates):
    """One set's calibration examples: n kept of n_asked prompts (refusal_rate = n_refused_greedy / n_asked);
    n_recovered refusals drawn by a re-draw, n_dropped prompts without one, n_filled non-refusals kept to reach
    calibrate.min_kept."""
    n_asked: int
    n_refused_greedy: int
    n_recovered: int
    n_dropped: int
    n_filled: int


@dataclass(kw_only=True)
class CalibrateMetrics(Record):
    role: str | None = optional()
    sets: dict[str, CalibrationSet] | None = optional()


@dataclass(kw_only=True)
class RegionSize(Record):
    density: float = rate()
    size: int | None = optional()


@dataclass(kw_only=True)
class IdentifiedRegions(Record):
    raw: RegionSize
    refined: RegionSize


@dataclass(kw_only=True)
class IdentifyMetrics(Record):
    method: str
    role: str
    datasets: dict[str, IdentifiedRegions]


@dataclass(kw_only=True)
class PairedRecord(EstimateRecord):
    """A paired ASR difference (`validate.paired`): the Estimate, its discordant-pair rate and the minimal effect
    that an exact McNemar test detects with 80% power at this n and discordance (None where none can)."""
    discordance: float | None = rate(None)
    mde: float | None = optional()


@dataclass(kw_only=True)
class RandomDraw(Rates):
    """One random control draw: its rates and ASR(region) − ASR(this draw)."""
    paired: PairedRecord


@dataclass(kw_only=True)
class RandomSpread(Record):
    """The spread of the random control over its draws."""
    draws: int
    asr_min: float = rate()
    asr_max: float = rate()
    effect_min: float = field(metadata={"lo": -1.0, "hi": 1.0})
    effect_max: float = field(metadata={"lo": -1.0, "hi": 1.0})
    effect_sd: float | None = optional()


@dataclass(kw_only=True)
class ValidateCondition(Record):
    """One (model, method, dataset): the region and the first random arm, their paired difference and utility;
    the region vs the intact model, every random draw and its spread, the importance-matched control (primary
    region only) and whether the positive control made a null result testable."""
    region: Rates
    random: Rates
    paired: EstimateRecord
    n: int | None = optional()
    n_utility: int | None = optional()
    utility_ratio: float | None = optional()
    utility_ratio_ci: Interval | None = optional()
    utility_ratio_random: float | None = optional()
    vs_intact: PairedRecord | None = optional()
    # controls: every random draw (the primary region has validate.random_draws, the others one), the matched one
    random_draws: dict[str, RandomDraw] | None = optional()
    random_spread: RandomSpread | None = optional()
    matched: Rates | None = optional()
    paired_matched: PairedRecord | None = optional()
    utility_ratio_matched: float | None = optional()
    testable: bool | None = optional()


@dataclass(kw_only=True)
class PositiveControl(Record):
    """The refusal direction ablated (`validate.positive_control`): its arm, its ASR rise over the intact model,
    and whether that rise clears the region claim's threshold at this n (`detected`); `null_label` is what a
    null region result reads where it does not."""
    arm: Rates
    vs_intact: PairedRecord
    threshold: float
    detected: bool
    null_label: str | None = optional()
    utility_ratio: float | None = optional()


@dataclass(kw_only=True)
class PowerRecord(Record):
    """`power.PowerPlan`: the n the pre-registered effect needs, the n run and its minimal detectable effect."""
    n_required: int
    n: int
    effect: float = rate()
    discordance: float = rate()
    power: float = rate()
    alpha: float = rate()
    mde: float | None = optional()
    test: str


@dataclass(kw_only=True)
class DegenerateRule(Record):
    """`degenerate_labels.rule_metrics`: the rule's error rates on outputs labelled by construction (n of them),
    with the fluency floor, and `text_rules_only`, the rule without it; `applied` names the one the stages use."""
    n: int
    false_positive_rate: float = rate()
    false_negative_rate: float = rate()
    text_rules_only: dict[str, Any]
    applied: str | None = optional()


@dataclass(kw_only=True)
class Rejudged(Record):
    """`rejudge.rejudge`: one comparison's discordant pairs judged again at a longer length."""
    arms: list[str]
    max_new_tokens: int
    n_discordant: int
    agreement: EstimateRecord | None = optional()
    effect_short: EstimateRecord
    effect_rejudged: EstimateRecord


@dataclass(kw_only=True)
class ValidateMetrics(Record):
    """{MODEL: {METHOD: {DATASET: condition}}}; "intact": {MODEL: rates} is the reference; "positive_control":
    {MODEL: record}; "power": the sample-size plan; "rejudged": {MODEL: {comparison: Rejudged}}."""
    models: dict[str, dict[str, dict[str, ValidateCondition]]]
    intact: dict[str, Rates] | None = optional()
    positive_control: dict[str, PositiveControl] | None = optional()
    power: PowerRecord | None = optional()
    degenerate_rule: DegenerateRule | None = optional()
    rejudged: dict[str, dict[str, Rejudged]] | None = optional()
    REST: ClassVar[str] = "models"


@dataclass(kw_only=True)
class DatasetEstimate(Record):
    """A `dataset_bootstrap.estimate`: a mean over dataset pairs, n = datasets, its dataset-bootstrap 95% ci and
    p against `null`; ci and p are null where no interval can be formed, and `reason` says why."""
    n: int
    effect: float | None = field(metadata={"lo": None})
    ci: Interval | None = optional()
    test: str
    p: float | None = rate(None)
    null: float | None = optional(lo=None)
    reason: str | None = optional()

    def estimate(self) -> evidence.Estimate | None:
        """The Estimate (ci NaN where there is none, so `evidence.verdict` reads it inconclusive); None where
        the mean is undefined."""
        if self.effect is None:
            return None
        ci = (math.nan, math.nan) if self.ci is None else tuple(math.nan if c is None else float(c) for c in self.ci)
        return evidence.Estimate(self.n, float(self.effect), ci, self.test, self.p)


@dataclass(kw_only=True)
class MeanIou(Record):
    mean_iou: float | None = rate()
    chance_iou: float | None = rate()
    mean_iou_ci: Interval | None = optional()    # = iou.ci
    n_pairs: int | None = optional()
    n_datasets: int | None = optional()
    iou: DatasetEstimate | None = optional()     # the mean IoU over dataset pairs, dataset bootstrap
    corrected: DatasetEstimate | None = optional()   # the same for (IoU − chance) / (1 − chance), pair by pair

    def estimate(self) -> evidence.Estimate | None:
        """Mean IoU over dataset pairs as an Estimate (n = datasets); None where undefined."""
        if self.iou is not None:
            return self.iou.estimate()
        if self.mean_iou is None or not self.n_pairs:
            return None
        return EstimateRecord(n=self.n_pairs, effect=self.mean_iou, ci=self.mean_iou_ci or [None, None],
                              test="percentile bootstrap over dataset pairs").estimate()


@dataclass(kw_only=True)
class OverlapMethod(Record):
    raw: MeanIou
    refined: MeanIou
    refined_minus_raw: DatasetEstimate | None = optional()
    refined_minus_raw_corrected: DatasetEstimate | None = optional()
    split_half_iou: float | None = rate(None)
    between_half_iou: float | None = rate(None)


@dataclass(kw_only=True)
class OverlapMetrics(Record):
    """{MODEL: {METHOD: overlap of its regions across datasets}}."""
    models: dict[str, dict[str, OverlapMethod]]
    REST: ClassVar[str] = "models"


@dataclass(kw_only=True)
class Perturbation(Record):
    """Rates per perturbation condition that ran (none, top, random, bottom) and ASR(top) − ASR(random)."""
    conditions: dict[str, Rates]
    top_vs_random: EstimateRecord | None = optional()
    REST: ClassVar[str] = "conditions"


@dataclass(kw_only=True)
class EsiPart(EstimateRecord):
    """One part of the ESI architecture claim (`methods.esi_architecture.part_estimates`): effect = the part's
    share of the safety ESI mass minus its share of the null mass, blocks only; n = safety prompts; `reason`
    where the part has no member."""
    reason: str | None = optional()
    safety_vs_entries: EstimateRecord | None = optional()
    null_vs_entries: EstimateRecord | None = optional()
    n_null: int | None = optional()
    safety_share: float | None = rate(None)
    null_share: float | None = rate(None)
    entry_share: float | None = rate(None)


@dataclass(kw_only=True)
class EsiArchitecture(Record):
    """Where the ESI mass sits (docs/methods.md §4.4): the claim's parts, the rows outside the blocks."""
    parts: dict[str, EsiPart]
    n_prompts: int
    n_null_prompts: int
    rows: dict[str, Any] = optional()


@dataclass(kw_only=True)
class EsiModel(Record):
    asr_topk: float | None = rate()    # None: that perturbation condition did not run
    asr_random: float | None = rate()
    asr_bottomk: float | None = rate()
    component_share: dict[str, float] = rate()
    faithful_vs_fixed_iou: float | None = rate()
    asr_none: float | None = rate(None)
    perturbation: Perturbation | None = optional()
    architecture: EsiArchitecture | None = optional()
    judge: str | None = optional()
    judge_token_coverage: float | None = rate(None)
    n_eval: int | None = optional()


@dataclass(kw_only=True)
class EsiMetrics(Record):
    """{MODEL: ESI of its role}."""
    models: dict[str, EsiModel]
    REST: ClassVar[str] = "models"


@dataclass(kw_only=True)
class SetArm(Record):
    asr_before: float = rate()
    asr_after: float = rate()
    utility_after: float = number()
    trainable_fraction: float = rate()
    utility_before: float | None = optional()
    benign_refusal_before: float | None = rate(None)
    benign_refusal_after: float | None = rate(None)
    degenerate_rate_after: float | None = rate(None)
    n_eval: int | None = optional()
    n_benign: int | None = optional()
    n_utility: int | None = optional()


@dataclass(kw_only=True)
class Margin(Record):
    """A pre-registered threshold of `evidence.verdict`: the claim is "effect <direction> threshold"."""
    threshold: float = number(lo=None)
    direction: str


@dataclass(kw_only=True)
class SetMetrics(Record):
    """{ARM: before/after}, "comparison": {name: Estimate} (the SET arm's relative reduction, SET vs random),
    "preservation": {ARM: {"over_refusal_rise" | "utility_ratio": Estimate}} (paired before/after on held-out
    prompts), "margins": {part: Margin} (the pre-registered non-inferiority margins), "utility_answers": the untuned
    answers utility is scored on (n, max_new_tokens, mean_tokens, ended_early)."""
    arms: dict[str, SetArm]
    comparison: dict[str, EstimateRecord] | None = optional()
    preservation: dict[str, dict[str, EstimateRecord]] | None = optional()
    margins: dict[str, Margin] | None = optional()
    utility_answers: dict[str, float] | None = optional()
    REST: ClassVar[str] = "arms"
    REQUIRED_REST: ClassVar[tuple[str, ...]] = ("set",)


@dataclass(kw_only=True)
class SpaArm(Record):
    asr_before: float = rate()
    asr_after: float = rate()
    task_score: float = number()
    task_score_before: float | None = optional()
    task_likelihood: float | None = optional()
    task_likelihood_before: float | None = optional()
    task_accuracy: float | None = rate(None)          # SST-2 lenient accuracy (first label word), not tested
    task_accuracy_before: float | None = rate(None)
    n_eval: int | None = optional()
    n_task: int | None = optional()


@dataclass(kw_only=True)
class SpaTask(Record):
    """{ARM: ASR and task score before/after} on one fine-tuning task; the SPA arm is required."""
    arms: dict[str, SpaArm]
    REST: ClassVar[str] = "arms"
    REQUIRED_REST: ClassVar[tuple[str, ...]] = ("spa",)


@dataclass(kw_only=True)
class SpaPower(Record):
    """What a task's n paired harmful prompts can detect (exact McNemar, 80% power, 5%) beside the paper's
    threshold: at best (every discordant prompt one way) and at the SPA-vs-full discordance observed."""
    n: int
    threshold: float = number()
    power: float = rate()
    alpha: float = rate()
    mde_best_case: float | None = rate(None)
    discordance: float | None = rate(None)
    mde_observed: float | None = rate(None)


@dataclass(kw_only=True)
class SpaMetrics(Record):
    """{TASK: {ARM: before/after}}, "drift": {TASK: {ARM: Estimate of ASR after − before}}, "comparison":
    {TASK: {name: Estimate}} (spa_vs_full, spa_vs_random: ASR after, paired; task_gain_ARM: task score after −
    before, paired), "power": {TASK: SpaPower}."""
    tasks: dict[str, SpaTask]
    drift: dict[str, dict[str, EstimateRecord]] | None = optional()
    comparison: dict[str, dict[str, EstimateRecord]] | None = optional()
    power: dict[str, SpaPower] | None = optional()
    REST: ClassVar[str] = "tasks"


@dataclass(kw_only=True)
class PartNumbers(Record):
    n: int
    effect: float | None = field(metadata={"lo": None})
    ci_low: float | None = field(metadata={"lo": None})
    ci_high: float | None = field(metadata={"lo": None})
    p: float | None = rate()
    p_holm: float | None = rate()
    mde: float | None = rate(None)   # minimal detectable effect (80% power) of a paired binary comparison
    verdict: str


@dataclass(kw_only=True)
class ClaimNumbers(Record):
    """A claim's verdict (the conjunction of its parts) and each part's numbers, keyed "name @ condition"."""
    verdict: str
    parts: dict[str, PartNumbers]


@dataclass(kw_only=True)
class ReportMetrics(Record):
    """A verdict per claim with its parts' numbers, the verdict counts, how many stages ran, the summed wall time."""
    claims: dict[str, ClaimNumbers]
    verdicts: dict[str, int]
    stages_run: int
    wall_seconds_total: float = number()


METRICS: dict[str, type[Record]] = {
    "data": DataMetrics, "models": ModelsMetrics, "baseline": BaselineMetrics, "calibrate": CalibrateMetrics,
    "identify": IdentifyMetrics, "validate": ValidateMetrics, "overlap": OverlapMetrics, "esi": EsiMetrics,
    "set": SetMetrics, "spa": SpaMetrics, "report": ReportMetrics}


# ---------------------------------------------------------------- writing and reading


def save(stage: str, path: str | Path, metrics: dict | Record) -> Record:
    """Write `metrics` (a dict or the stage's record) to `path` after checking it against the stage's record."""
    record = metrics if isinstance(metrics, Record) else METRICS[stage].parse(metrics, path)
    if not isinstance(record, METRICS[stage]):
        raise TypeError(f"{stage} metrics must be a {METRICS[stage].__name__}, got {type(record).__name__}")
    write_json(path, record.to_dict())
    return record


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise MetricsError(f"{path}: not valid JSON ({e})") from None


def read(stage: str, path: str | Path) -> Record:
    """One metrics file as its stage's record."""
    return METRICS[stage].parse(read_json(Path(path)), path)


def matrix_files(root: str | Path, stage: str) -> list[Path]:
    """results/<stage>/<item>/metrics.json of a matrix stage (temporary folders excluded)."""
    return [f for f in sorted((Path(root) / "results" / stage).glob("*/metrics.json"))
            if not f.parent.name.startswith(".")]


def load_results(root: str | Path = ".") -> dict[str, Any]:
    """{stage: record} for every stage in STAGES; None where the stage wrote no metrics (not run). Matrix
    stages give {item folder: record}. Every file present is checked against its stage's record."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        if stage in MATRIX_STAGES:
            out[stage] = {f.parent.name: read(stage, f) for f in matrix_files(root, stage)} or None
            continue
        f = Path(root) / "results" / stage / "metrics.json"
        out[stage] = read(stage, f) if f.exists() else None
    return out
