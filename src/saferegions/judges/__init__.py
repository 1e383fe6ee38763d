"""Judges: one interface, `judge(prompts, responses) -> Verdicts`, and one factory, `get(kind, cfg)`.

`complied` is True when the response does not refuse. A judge sees no coherence: empty or looping text
("citcit…") passes a keyword judge as compliance, so ASR and refusal rates come from `evaluation.outcomes`, which
classifies degenerate responses first and asks the judge only about the rest (docs/methods.md §5.6). Raw
generations are saved separately so judges can be swapped without regenerating. `soft` holds the differentiable
forms ESI uses and `transfer` the judge-to-target vocabulary map.
"""
from __future__ import annotations

from pathlib import Path

from ..checks import ConfigError
from ..config import JudgeKind
from . import soft, transfer
from .agreement import cohen_kappa
from .harmbench import HarmBenchJudge
from .keyword import REFUSAL_PHRASES, KeywordJudge
from .learned import LearnedJudge, fit_learned_judge
from .llama_guard import LlamaGuardJudge
from .soft import GuardSoftJudge, LearnedSoftJudge
from .verdicts import Verdicts

__all__ = ["JudgeKind", "JUDGES", "get", "Verdicts", "KeywordJudge", "LearnedJudge", "LlamaGuardJudge",
           "HarmBenchJudge", "LearnedSoftJudge", "GuardSoftJudge", "REFUSAL_PHRASES", "cohen_kappa",
           "fit_learned_judge", "soft", "transfer"]

JUDGES = {JudgeKind.KEYWORD: KeywordJudge, JudgeKind.LEARNED: LearnedJudge,
          JudgeKind.LLAMA_GUARD: LlamaGuardJudge, JudgeKind.HARMBENCH: HarmBenchJudge}
"""The class of every judge kind; each builds itself from the params with `from_config(cfg, models_root, ...)`."""


def get(kind: JudgeKind | str, cfg, models_root: str | Path = "models", **options):
    """The judge of `kind` the params `cfg` describe (its `judges.<kind>` section; model judges load in the run's
    dtype and device). `options` go to that judge's `from_config` (the learned judge's `head` path)."""
    try:
        kind = JudgeKind(kind)
    except ValueError:
        raise ConfigError(f"unknown judge {kind!r}; valid: {', '.join(k.value for k in JudgeKind)}") from None
    return JUDGES[kind].from_config(cfg, models_root, **options)
