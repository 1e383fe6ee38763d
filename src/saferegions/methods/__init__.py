"""The method registry: one `Method` entry per identification method of paper 1 (docs/methods.md §2).

An entry says everything the rest of the code needs about a method: its runner (`Context -> (dataset, kind,
Region)` items), the one-paragraph description the notebook shows, its params sub-section `identify.<name>`
(a dataclass, in `params.py` for the built-in methods), and the granularity its regions are removed at (a key of
`GRANULARITIES`). `config` builds the `identify` section and the list of valid method names from `REGISTRY`,
the identify stage runs `Method.run`, and `methods.removal.ablation` / `.random_control` dispatch on the
granularity a region carries in its meta.
Adding a method is one `register(Method(...))` call (tests/template_test_method.py).

This module imports no torch: validating params reads it, and runners and granularities are named as
"module:attribute" and imported when first used. A method's runner lives in `methods/<its name>.py`: the DVC
matrix item of the identify stage names that file (`saferegions.deps`).
"""
from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..checks import ConfigError, _choice
from .params import LAYER_MIN_PROMPTS, PROMPT_SETS, QK_MODES  # noqa: F401  (re-exported)
from .params import LayerCfg, NeuronCfg, NlsrCfg, SnipCfg, WandaCfg

# Granularity name (stored in a region's meta) -> the class that ablates it and draws its random control.
GRANULARITIES = {"weights": "saferegions.methods.removal:Weights",
                 "neurons": "saferegions.methods.neuron:Neurons",
                 "layers": "saferegions.methods.layer:Layers"}


class Resolves(enum.Enum):
    """What of the registry a stage resolves at run time, declared in its module as `RESOLVES = Resolves.X`:
    `saferegions.deps` makes the stage's DVC deps the code of exactly that."""
    ITEM_METHOD = "the runner, diagnostics and granularity of the stage's `method` matrix item"
    GRANULARITIES = "every granularity: the stage removes regions of any method"
    SCORES = "every method's per-example score function: the stage re-identifies on resampled examples"


def resolve(ref):
    """A "module:attribute" reference imported now; anything else is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def granularity(name: str):
    """The granularity object registered under `name` (one error listing the valid names)."""
    if name not in GRANULARITIES:
        raise ValueError(f"unknown granularity {name!r}; valid: {', '.join(GRANULARITIES)}")
    return resolve(GRANULARITIES[name])()


@dataclass(frozen=True)
class Method:
    """One identification method: all that `config`, the identify stage and validation need to know."""
    name: str
    runner: Callable | str       # Context -> iterator of (dataset, kind, Region); or "module:function"
    description: str             # markdown shown at the top of the identify notebook
    config: type                 # dataclass of params `identify.<name>`; needs a `datasets` field
    granularity: str = "weights"   # key of GRANULARITIES
    diagnostics: Callable | str | None = None   # (Context, cfg) -> method-specific notebook items, see `report`
    scores: Callable | str | None = None   # (model, batches, progress) -> {name: score}: a sum over examples, so
                                           # the overlap bootstrap can resample them; None = not resamplable
    memory_phase: Callable | str | None = None   # memory plan of its identify peak (None: hooked forwards only)
    sharded: bool = False        # its runner scores local shards of an FSDP2-sharded model (run.distributed: fsdp)

    def __post_init__(self):
        _choice(f"method {self.name!r}: granularity", self.granularity, GRANULARITIES)

    def run(self, ctx):
        return resolve(self.runner)(ctx)

    def score(self, model, batches, progress: bool = False) -> dict:
        return resolve(self.scores)(model, batches, progress=progress)

    def report(self, ctx, cfg) -> dict:
        """What the identify notebook shows beyond the regions: {"text": [str], "tables": [frame or Styler],
        "curves": [{"file", "frame", "x", "y", "hue", "title", "xlabel", "ylabel"}]} (empty for most methods)."""
        out = {"text": [], "tables": [], "curves": []}
        if self.diagnostics is not None:
            out.update(resolve(self.diagnostics)(ctx, cfg))
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


def resamplable() -> tuple[str, ...]:
    """Methods whose scores the overlap bootstrap can recompute on resampled examples."""
    return tuple(m.name for m in REGISTRY.values() if m.scores is not None)


def sharded() -> tuple[str, ...]:
    """Methods the identify stage runs under `run.distributed: fsdp`."""
    return tuple(m.name for m in REGISTRY.values() if m.sharded)


def weight_level() -> tuple[str, ...]:
    """Methods whose regions are sets of weight entries (comparable entry by entry with ESI's)."""
    return tuple(m.name for m in REGISTRY.values() if m.granularity == "weights")


# ---------------------------------------------------------------- the built-in methods, in paper order

def _score_based(name: str, description: str, config: type) -> Method:
    """A weight-level method whose score is a sum over calibration examples: `methods/<name>.py` holds `run`
    and `<name>_scores`, `memory.<name>_phase` its memory plan. Its scores are computed on local shards too."""
    return register(Method(name, f"saferegions.methods.{name}:run", description, config, "weights",
                           scores=f"saferegions.methods.{name}:{name}_scores",
                           memory_phase=f"saferegions.memory:{name}_phase", sharded=True))


_score_based(
    "snip",
    "**SNIP** (Wei et al. 2024): I = |W| ⊙ Σ_s |∂L_s/∂W|, L_s = cross-entropy on the response tokens of "
    "calibration example s; region = top-q per matrix; refined = top-q(safety) \\ top-p(utility).",
    SnipCfg)
_score_based(
    "wanda",
    "**Wanda** (Wei et al. 2024): I_ij = |W_ij| · ‖X_j‖₂ over response-token inputs; region = top-q per "
    "matrix; refined = top-q(safety) \\ top-p(utility).",
    WandaCfg)
register(Method(
    "neuron", "saferegions.methods.neuron:run",
    "**Safety neurons** (SN-Tune detector): per prompt, the top fraction of attention (q/k/v/o) and FFN "
    "neurons by the change their deactivation makes to the sub-layer output, intersected over prompts; "
    "refined = safety neurons \\ utility neurons; projected to rows/columns of the weights (§3.2).",
    NeuronCfg, "neurons", "saferegions.methods.neuron:diagnostics"))
register(Method(
    "layer", "saferegions.methods.layer:run",
    "**SafeLayer** (Shen Li et al. 2025): where the last-token cosine similarity of normal–malicious "
    "prompt pairs parts from same-type pairs (step 1), refined by the over-rejection sweep (step 2); "
    "refined = safety layers \\ layers found with the utility set as the 'malicious' side.",
    LayerCfg, "layers", "saferegions.methods.layer:diagnostics"))
register(Method(
    "nlsr", "saferegions.methods.nlsr:run",
    "**NLSR** (Yi et al. 2025): one safety LoRA (harmful → refusal), expo-rescaled; per dataset the "
    "ActSVD low-rank projection on that dataset's activations, top keep_frac |W| per LoRA matrix; "
    "refined = safety \\ utility on LoRA entries; projected to base weights by |ΔW| (§3.2).",
    NlsrCfg, "weights", "saferegions.methods.nlsr:diagnostics", memory_phase="saferegions.memory:nlsr_phase"))
