"""The params sub-sections `identify.<method>` of the built-in methods: plain dataclasses, no torch, so that
validating params (`config`) never imports a method's runner. Defaults are the paper-scale values of
docs/methods.md; params.yaml scales them down for the CPU budget."""
from __future__ import annotations

from dataclasses import dataclass

from ..checks import ConfigError, _choice, _fraction, _positive
from ..data import BENIGN_SETS, SAFETY_SETS

PROMPT_SETS = SAFETY_SETS + BENIGN_SETS
QK_MODES = ("ablate", "plnd")
LAYER_MIN_PROMPTS = 16   # SafeLayer's random pairs need distinct prompts: 16 per side = 120 distinct same-type pairs


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
