"""The method registry: one `Method` entry per identification method of paper 1 (docs/methods.md §2).

An entry says everything the rest of the code needs about a method: its runner (`Context -> (dataset, kind,
Region)` items), the one-paragraph description the notebook shows, its params sub-section `identify.<name>`
(a dataclass), and the granularity its regions are removed at (a key of `GRANULARITIES`). `config` builds the
`identify` section and the list of valid method names from `REGISTRY`, the identify stage runs `Method.run`,
and `methods.removal.ablation` / `.random_control` dispatch on the granularity a region carries in its meta.
Adding a method is one `register(Method(...))` call (tests/template_test_method.py).

This module imports no torch: validating params reads it, and runners and granularities are named as
"module:attribute" and imported when first used.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..checks import ConfigError, _choice, _fraction, _positive
from ..data import BENIGN_SETS, SAFETY_SETS

PROMPT_SETS = SAFETY_SETS + BENIGN_SETS
QK_MODES = ("ablate", "plnd")
LAYER_MIN_PROMPTS = 16   # SafeLayer's random pairs need distinct prompts: 16 per side = 120 distinct same-type pairs

# Granularity name (stored in a region's meta) -> the class that ablates it and draws its random control.
GRANULARITIES = {"weights": "saferegions.methods.removal:Weights",
                 "neurons": "saferegions.methods.neurons:Neurons",
                 "layers": "saferegions.methods.layers:Layers"}


def _resolve(ref):
    """A "module:attribute" reference imported now; anything else is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def granularity(name: str):
    """The granularity object registered under `name` (one error listing the valid names)."""
    if name not in GRANULARITIES:
        raise ValueError(f"unknown granularity {name!r}; valid: {', '.join(GRANULARITIES)}")
    return _resolve(GRANULARITIES[name])()


@dataclass(frozen=True)
class Method:
    """One identification method: all that `config`, the identify stage and validation need to know."""
    name: str
    runner: Callable | str       # Context -> iterator of (dataset, kind, Region); or "module:function"
    description: str             # markdown shown at the top of the identify notebook
    config: type                 # dataclass of params `identify.<name>`; needs a `datasets` field
    granularity: str = "weights"   # key of GRANULARITIES
    diagnostics: Callable | str | None = None   # (Context, cfg) -> method-specific notebook items, see `report`

    def __post_init__(self):
        _choice(f"method {self.name!r}: granularity", self.granularity, GRANULARITIES)

    def run(self, ctx):
        return _resolve(self.runner)(ctx)

    def report(self, ctx, cfg) -> dict:
        """What the identify notebook shows beyond the regions: {"text": [str], "tables": [frame or Styler],
        "curves": [{"file", "frame", "x", "y", "hue", "title", "xlabel", "ylabel"}]} (empty for most methods)."""
        out = {"text": [], "tables": [], "curves": []}
        if self.diagnostics is not None:
            out.update(_resolve(self.diagnostics)(ctx, cfg))
        return out


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method; from then on params, the identify stage and validation accept it."""
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; valid choices: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# ---------------------------------------------------------------- params of the built-in methods
# Dataclass defaults are the paper-scale values of docs/methods.md; params.yaml scales them down for the CPU budget.


@dataclass
class WandaCfg:
    datasets: list[str] | None = None   # identification datasets this method runs on (None = calibrate.datasets)
    p: float | None = None       # this method's top-p of the utility scores (None = identify.p): the p/q sweep's
                                 # pick where identify.p leaves < identify.min_utility_ratio of utility

    def __post_init__(self):
        if self.p is not None:
            _fraction("identify.wanda.p", self.p)


@dataclass
class SnipCfg:
    n: int | None = None         # calibration examples per dataset used (None = all calibrate.n)
    datasets: list[str] | None = None
    p: float | None = None       # as WandaCfg.p

    def __post_init__(self):
        if self.n is not None:
            _positive("identify.snip.n", self.n)
        if self.p is not None:
            _fraction("identify.snip.p", self.p)


@dataclass
class NeuronCfg:
    attn_frac: float = 0.06      # docs/methods.md §2.2 (≈ SN-Tune's 1000 / 16,384)
    ffn_frac: float = 0.18       # (≈ 2000 / 11,008)
    min_prompt_frac: float = 1.0  # 1.0 = SN-Tune's intersection over prompts
    qk_mode: str = "ablate"
    chunk: int = 16
    attn_rank: str = "joint"
    n: int | None = None         # calibration prompts per set (None = calibrate.n); examples beyond calibrate.n
                                 # are answered by the identify stage itself, so only this method pays for them
    datasets: list[str] | None = None

    def __post_init__(self):
        if self.n is not None:
            _positive("identify.neuron.n", self.n)
        for k in ("attn_frac", "ffn_frac", "min_prompt_frac"):
            _fraction(f"identify.neuron.{k}", getattr(self, k))
        _choice("identify.neuron.qk_mode", self.qk_mode, QK_MODES)
        _choice("identify.neuron.attn_rank", self.attn_rank, ("joint", "per_unit"))
        _positive("identify.neuron.chunk", self.chunk)


@dataclass
class LayerCfg:
    normal_set: str = "alpaca"     # the "N" side of the cosine analysis; each dataset is the "M" side
    n: int = 100                   # prompts per side (reference: 100 normal, 100 malicious); >= LAYER_MIN_PROMPTS
    overrej_set: str = "xstest_safe"
    n_overrej: int = 128           # over-rejection prompts (reference: 721 / 731)
    pairs: int = 500
    jump: float = 0.001
    grow: float = 1e-4
    alpha: float = 1.1
    sweep_radius: int = 3          # 0 = step 1 only (no over-rejection generations)
    max_new_tokens: int = 16
    scale_o_proj: bool = True
    datasets: list[str] | None = None

    def __post_init__(self):
        _choice("identify.layer.normal_set", self.normal_set, PROMPT_SETS)
        _choice("identify.layer.overrej_set", self.overrej_set, PROMPT_SETS)
        for k in ("n_overrej", "pairs", "max_new_tokens", "alpha"):
            _positive(f"identify.layer.{k}", getattr(self, k))
        if self.n < LAYER_MIN_PROMPTS:
            raise ConfigError(f"identify.layer.n: {self.n} prompts per side give only {self.n * (self.n - 1) // 2} "
                              f"distinct same-type pairs for the {self.pairs} random pairs; use at least "
                              f"{LAYER_MIN_PROMPTS} ({LAYER_MIN_PROMPTS * (LAYER_MIN_PROMPTS - 1) // 2} pairs)")
        if self.sweep_radius < 0:
            raise ConfigError(f"identify.layer.sweep_radius: must be >= 0, got {self.sweep_radius}")


@dataclass
class NlsrCfg:
    lora_r: int = 8
    lora_alpha: float = 32
    dropout: float = 0.05
    steps: int = 200             # the most steps (docs/methods.md §2.4: 200); fewer if early stopping ends first
    lr: float = 1e-4
    batch_size: int = 4
    max_length: int = 512
    heldout: int = 8             # alignment pairs held out as ONE fixed batch: held-out loss before/after training
    eval_every: int = 10         # steps between held-out evaluations
    patience: int = 0            # stop after this many evaluations without a fall > min_delta (0 = run all steps)
    min_delta: float = 0.0
    seed_check: bool = True      # train a second LoRA (init seed + 1) and report the two regions' IoU vs chance
    expo_alpha: float = 0.9
    rank_ratio: float = 0.8
    keep_frac: float = 0.2
    datasets: list[str] | None = None

    def __post_init__(self):
        for k in ("lora_r", "steps", "lr", "batch_size", "max_length", "expo_alpha", "heldout", "eval_every"):
            _positive(f"identify.nlsr.{k}", getattr(self, k))
        for k in ("patience", "min_delta"):
            if getattr(self, k) < 0:
                raise ConfigError(f"identify.nlsr.{k}: must be >= 0, got {getattr(self, k)!r}")
        _fraction("identify.nlsr.rank_ratio", self.rank_ratio)
        _fraction("identify.nlsr.keep_frac", self.keep_frac)


# ---------------------------------------------------------------- the built-in methods, in paper order

register(Method(
    "snip", "saferegions.methods.snip:run",
    "**SNIP** (Wei et al. 2024): I = |W| ⊙ Σ_s |∂L_s/∂W|, L_s = cross-entropy on the response tokens of "
    "calibration example s; region = top-q per matrix; refined = top-q(safety) \\ top-p(utility).",
    SnipCfg, "weights"))
register(Method(
    "wanda", "saferegions.methods.wanda:run",
    "**Wanda** (Wei et al. 2024): I_ij = |W_ij| · ‖X_j‖₂ over response-token inputs; region = top-q per "
    "matrix; refined = top-q(safety) \\ top-p(utility).",
    WandaCfg, "weights"))
register(Method(
    "neuron", "saferegions.methods.neurons:run",
    "**Safety neurons** (SN-Tune detector): per prompt, the top fraction of attention (q/k/v/o) and FFN "
    "neurons by the change their deactivation makes to the sub-layer output, intersected over prompts; "
    "refined = safety neurons \\ utility neurons; projected to rows/columns of the weights (§3.2).",
    NeuronCfg, "neurons", "saferegions.methods.neurons:diagnostics"))
register(Method(
    "layer", "saferegions.methods.layers:run",
    "**SafeLayer** (Shen Li et al. 2025): where the last-token cosine similarity of normal–malicious "
    "prompt pairs parts from same-type pairs (step 1), refined by the over-rejection sweep (step 2); "
    "refined = safety layers \\ layers found with the utility set as the 'malicious' side.",
    LayerCfg, "layers", "saferegions.methods.layers:diagnostics"))
register(Method(
    "nlsr", "saferegions.methods.nlsr:run",
    "**NLSR** (Yi et al. 2025): one safety LoRA (harmful → refusal), expo-rescaled; per dataset the "
    "ActSVD low-rank projection on that dataset's activations, top keep_frac |W| per LoRA matrix; "
    "refined = safety \\ utility on LoRA entries; projected to base weights by |ΔW| (§3.2).",
    NlsrCfg, "weights", "saferegions.methods.nlsr:diagnostics"))
