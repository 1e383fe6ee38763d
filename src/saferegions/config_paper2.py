"""The params sections of paper 2's stages (esi, set, spa; docs/methods.md §4), with their own checks;
`config` parses them with the rest."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import methods
from .checks import ConfigError, _choice, _fraction, _positive, _subset
from .data import BENIGN_SETS, SAFETY_SETS

# ESI (paper 2, docs/methods.md §4.1-§4.5). Defaults = the paper / reference-code values.
ESI_VARIANTS = ("faithful", "fixed")
ESI_JUDGES = ("learned", "guard")
ESI_OBJECTIVES = ("judge", "refusal_likelihood", "response_likelihood")
ESI_SCORES = ("esi", "grad", "grad_std_mag")
RANDOM_MODES = ("per_matrix_matched", "global_uniform")


@dataclass
class EsiCfg:
    """ESI regions of each model role, their architecture profile and the perturbation check (stage `esi`).
    The first entry of `judges` and of `objectives` makes the primary region (saved for SET/SPA); every other
    entry, and the other `variant`, makes a comparison region whose IoU with the primary is reported."""
    models: list[str] = field(default_factory=lambda: ["aligned", "unaligned"])   # SET: unaligned, SPA: aligned
    dataset: str = "advbench"        # harmful set of the primary region (reference: all 520 AdvBench goals)
    n_prompts: int | None = None     # ident prompts used (None = the whole ident split)
    max_new_tokens: int = 256        # greedy response length (§4.2 step 1)
    gen_batch_size: int = 1          # prompts generated together (1 = the reference)
    system_prompt: str | None = "You are a helpful assistant."
    variant: str = "faithful"        # the reference's quirks (§4.2 table); the other variant is compared
    judges: list[str] = field(default_factory=lambda: ["guard", "learned"])   # guard = judges.llama_guard
    guard_score: str = "safe"        # 'safe' logit (reference) or 'safe_minus_unsafe' (§5.5 stand-in)
    objectives: list[str] = field(default_factory=lambda: ["judge", "refusal_likelihood"])
    score: str = "esi"               # esi | grad | grad_std_mag (§4.1 ablations)
    exclude_router: bool = True
    top_frac: float = 0.01           # k = int(top_frac x ALL parameters)
    random_mode: str = "per_matrix_matched"
    noise_ratio: float = 0.38        # perturbation: theta += eps * sigma_W * noise_ratio (§4.5)
    perturb_seeds: int = 3
    eval_sets: list[str] = field(default_factory=lambda: ["advbench"])   # held-out harmful prompts (eval split)
    n_eval: int | None = None        # eval prompts per set (None = the whole eval split)
    perturb_max_new_tokens: int = 512
    temperature: float = 0.9
    top_p: float = 0.95
    perturb_batch_size: int = 16
    perturb_conditions: list[str] = field(default_factory=lambda: ["none", "topk", "bottomk", "random"])
    perturb_models: list[str] | None = None   # roles whose regions are perturbed (None = all of `models`)
    n_mass_prompts: int | None = None   # ident prompts of the architecture claim's per-prompt ESI mass, and as
                                        # many null prompts (None = n_prompts)
    null_dataset: str = "alpaca"     # benign set of the null profile (log p of the model's own response)
    architecture_models: list[str] | None = None   # roles that get the architecture claim (None = all of `models`)
    datasets: list[str] = field(default_factory=lambda: list(SAFETY_SETS))   # beyond the paper: one region each
    dataset_models: list[str] | None = None   # roles that get the per-dataset regions (None = all of `models`)
    compare_methods: list[str] = field(default_factory=lambda: ["snip", "wanda"])   # paper-1 regions compared
                                                                                    # (weight-level methods)
    checkpoint_every: int = 16       # prompts between resume checkpoints of a gradient pass's running sums; 0 = none

    def __post_init__(self):
        if not self.models or len(set(self.models)) != len(self.models):
            raise ConfigError(f"esi.models: needs distinct model roles, got {self.models!r}")
        _choice("esi.dataset", self.dataset, SAFETY_SETS)
        _choice("esi.variant", self.variant, ESI_VARIANTS)
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"esi.checkpoint_every: must be an integer >= 0, got {self.checkpoint_every!r}")
        for key, valid in (("judges", ESI_JUDGES), ("objectives", ESI_OBJECTIVES)):
            values = getattr(self, key)
            if not values:
                raise ConfigError(f"esi.{key}: needs at least one entry")
            _subset(f"esi.{key}", values, valid)
        _choice("esi.guard_score", self.guard_score, ("safe", "safe_minus_unsafe"))
        _choice("esi.score", self.score, ESI_SCORES)
        _choice("esi.random_mode", self.random_mode, RANDOM_MODES)
        _fraction("esi.top_frac", self.top_frac)
        _subset("esi.eval_sets", self.eval_sets, SAFETY_SETS)
        _subset("esi.datasets", self.datasets, SAFETY_SETS)
        if self.dataset_models is not None:
            _subset("esi.dataset_models", self.dataset_models, self.models)
        _subset("esi.compare_methods", self.compare_methods, methods.weight_level())
        _subset("esi.perturb_conditions", self.perturb_conditions, ("none", "topk", "bottomk", "random"))
        if self.perturb_models is not None:
            _subset("esi.perturb_models", self.perturb_models, self.models)
        if self.architecture_models is not None:
            _subset("esi.architecture_models", self.architecture_models, self.models)
        _choice("esi.null_dataset", self.null_dataset, BENIGN_SETS)
        for k in ("max_new_tokens", "gen_batch_size", "perturb_seeds", "perturb_max_new_tokens", "temperature",
                  "perturb_batch_size"):
            _positive(f"esi.{k}", getattr(self, k))
        for k in ("n_prompts", "n_eval", "n_mass_prompts"):
            if getattr(self, k) is not None:
                _positive(f"esi.{k}", getattr(self, k))
        if self.noise_ratio < 0:
            raise ConfigError(f"esi.noise_ratio: must be >= 0, got {self.noise_ratio}")
        _fraction("esi.top_p", self.top_p)

    @property
    def judge(self) -> str:
        return self.judges[0]

    @property
    def objective(self) -> str:
        return self.objectives[0]
# ---------------------------------------------------------------- SET / SPA (paper 2, docs/methods.md §4.6)

SET_ARMS = ("set", "full", "lora", "random", "bottom", "benign_esi")   # benign_esi: top-k of a benign LM-loss ESI
SPA_ARMS = ("spa", "full", "random", "erode")   # erode: full FT with harmful compliant pairs mixed in
SPA_TASKS = ("gsm8k", "sst2")
OPTIMIZER_MODES = ("faithful", "sparse")
SCHEDULES = ("cosine", "constant")


@dataclass
class TuneCfg:
    """Training recipe shared by SET and SPA: the reference CLI's defaults (docs/methods.md §4.6) unless marked."""
    max_steps: int = 100         # optimizer steps (SET: project default 100 = the paper's "100 iterations")
    lr: float = 3e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    batch_size: int = 1          # per step: batch_size x grad_accum examples
    grad_accum: int = 4
    weight_decay: float = 0.01   # MaskedAdamW's own default, used by every arm (the Trainer's 0 is unused)
    max_grad_norm: float = 1.0   # HF Trainer default, not overridden by the reference [inference]; 0 = off
    max_length: int = 2048       # tokens per example, truncated at the end
    top_frac: float = 0.01       # ESI region size as a fraction of ALL parameters (checked against the file)
    optimizer_mode: str = "faithful"   # faithful = dense moments (reference); sparse = state only where trainable
    checkpoint_every: int = 25   # optimizer steps between resume checkpoints of a training arm; 0 = none
    ref_decay: bool = True       # weight decay inside the bias-corrected step, as the reference code
    force_bias_norm: bool = True  # biases and norms always trainable (the reference cannot turn it off)
    chat_template: bool = False  # reference: plain "Instruction: ...\nAnswer: ..." text
    loss_on_prompt: bool = True  # reference: labels = input ids (whole sequence)
    random_mode: str = "per_matrix_matched"   # random-mask control (regions.random_like)
    eval_sets: list[str] = field(default_factory=lambda: list(SAFETY_SETS))   # held-out harmful pool
    n_eval: int = 18             # eval-split prompts per harmful set
    max_new_tokens: int = 64     # safety evaluation responses (greedy)
    eval_batch_size: int = 16
    system_prompt: str | None = None   # null = the model's own default (generation and chat-template training)

    def _check(self, name: str):
        for k in ("max_steps", "lr", "batch_size", "grad_accum", "max_length", "n_eval", "max_new_tokens",
                  "eval_batch_size"):
            _positive(f"{name}.{k}", getattr(self, k))
        for k in ("weight_decay", "max_grad_norm", "warmup_ratio", "checkpoint_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{name}.{k}: must be >= 0, got {getattr(self, k)!r}")
        if self.warmup_ratio >= 1:
            raise ConfigError(f"{name}.warmup_ratio: must be < 1, got {self.warmup_ratio!r}")
        _fraction(f"{name}.top_frac", self.top_frac)
        _choice(f"{name}.schedule", self.schedule, SCHEDULES)
        _choice(f"{name}.optimizer_mode", self.optimizer_mode, OPTIMIZER_MODES)
        _choice(f"{name}.random_mode", self.random_mode, ("per_matrix_matched", "global_uniform"))
        _subset(f"{name}.eval_sets", self.eval_sets, SAFETY_SETS)


@dataclass
class SetCfg(TuneCfg):
    """SET: train only the unaligned model's ESI top-k on harmful -> refusal pairs, against baselines."""
    model: str = "unaligned"     # model role; its ESI regions come from artifacts/esi/<model>/
    arms: list[str] = field(default_factory=lambda: list(SET_ARMS))
    lora_r: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    benign_sets: list[str] = field(default_factory=lambda: list(BENIGN_SETS))   # over-refusal check
    n_benign: int = 48           # eval prompts per benign set (2 x 48 = 96 paired: the minimum for a claim)
    n_utility: int = 32          # Alpaca eval prompts after the benign ones: the utility score's prompts
    utility_max_new_tokens: int = 64   # the untuned model's answers to them (and to the importance prompts)
    n_importance: int = 32       # Alpaca ident prompts of the benign LM-loss ESI (arm benign_esi)

    def __post_init__(self):
        self._check("set")
        _subset("set.arms", self.arms, SET_ARMS)
        _subset("set.benign_sets", self.benign_sets, BENIGN_SETS)
        for k in ("lora_r", "lora_alpha", "n_benign", "n_utility", "utility_max_new_tokens", "n_importance"):
            _positive(f"set.{k}", getattr(self, k))
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"set.lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")


@dataclass
class SpaCfg(TuneCfg):
    """SPA: instruction-tune the aligned model with its ESI top-k frozen, against plain and random-freeze."""
    max_steps: int = 1000
    model: str = "aligned"
    arms: list[str] = field(default_factory=lambda: list(SPA_ARMS))
    tasks: list[str] = field(default_factory=lambda: list(SPA_TASKS))
    n_task: int = 200            # held-out task rows scored per task (project default)
    task_max_new_tokens: dict[str, int] = field(default_factory=lambda: {"gsm8k": 256, "sst2": 8})  # per task
    answer_only: bool = False    # GSM8K target: the worked solution (False) or only "The answer is N."
    harmful_fraction: float = 0.2   # share of harmful compliant pairs in arm `erode`'s data (the NLSR mix: 0.2)

    def __post_init__(self):
        self._check("spa")
        if not 0 < self.harmful_fraction < 1:
            raise ConfigError(f"spa.harmful_fraction: must be in (0, 1), got {self.harmful_fraction!r}")
        _subset("spa.arms", self.arms, SPA_ARMS)
        _subset("spa.tasks", self.tasks, SPA_TASKS)
        _positive("spa.n_task", self.n_task)
        for t in self.tasks:
            if t not in self.task_max_new_tokens:
                raise ConfigError(f"spa.task_max_new_tokens: no entry for task {t!r}")
            _positive(f"spa.task_max_new_tokens.{t}", self.task_max_new_tokens[t])


def check_esi(cfg) -> None:
    """Roles exist; a guard judge needs `judges.llama_guard`."""
    e = cfg.esi
    if getattr(cfg, "models", None) is not None:
        roles = sorted(cfg.models)
        _subset("esi.models", e.models, roles)
    if "guard" in e.judges and "judge" in e.objectives and getattr(cfg, "judges", None) is not None \
            and cfg.judges.llama_guard is None:
        raise ConfigError("esi.judges: 'guard' needs judges.llama_guard (a Llama-Guard-style model: "
                          "{id, offline}); the offline default uses [learned]")
