"""Model-family adapters: one `Arch` entry per transformers `model_type` says where a family keeps its decoder
blocks, attention, MLP, routed and shared experts and router, whether its lm_head can be tied, what its chat
template accepts, and how its tokenizer spells a refusal. Every method reads the layout from here, so adding a
family is one entry in `ARCHS` (and the family-parametrized tests in tests/test_arch.py cover it).

This module imports no torch: validating params and writing the report read it.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from functools import reduce

# Projection attribute -> component name, shared by every supported family (transformers 5.x).
ATTENTION_PROJECTIONS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
MLP_PROJECTIONS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
EXPERT_PROJECTIONS = {"gate_up_proj": "gate_up", "down_proj": "down"}   # fused [E, 2I, H] and [E, H, I]


class Part(enum.Enum):
    """Which part of a decoder block a weight belongs to."""
    ATTENTION = "attention"
    MLP = "mlp"                       # a dense MLP
    EXPERT = "expert"                 # routed experts (fused 3-D tensors)
    SHARED_EXPERT = "shared_expert"   # a dense expert every token uses (qwen2_moe)
    ROUTER = "router"                 # router linears: never in the weight methods' search space


@dataclass(frozen=True)
class Arch:
    family: str                        # config.model_type
    config: str                        # transformers config class (tiny random models are built from it)
    tiny: dict = field(default_factory=dict, hash=False)   # extra config of the tiny test model
    layers: str = "model.layers"       # attribute path of the decoder block list
    attention: str = "self_attn"
    mlp: str = "mlp"
    experts: str | None = None         # fused routed experts under the MLP
    shared_expert: str | None = None   # under the MLP
    routers: tuple[str, ...] = ()      # router linears under the MLP
    ties_lm_head: bool = False         # the family's checkpoints tie lm_head to the input embedding by default
    system_role: bool = True           # False: the chat template refuses a system turn; it is folded into the user turn

    @property
    def moe(self) -> bool:
        return self.experts is not None

    # ------------------------------------------------ modules of a loaded model

    def blocks(self, model) -> list:
        """The decoder blocks in order."""
        return list(reduce(getattr, self.layers.split("."), model))

    def attention_of(self, block):
        return getattr(block, self.attention)

    def ffn_of(self, block):
        """The dense MLP of a block, or its shared expert; None for a routed-only MoE block."""
        mlp = getattr(block, self.mlp)
        if not self.moe:
            return mlp
        return getattr(mlp, self.shared_expert) if self.shared_expert else None

    def experts_of(self, block):
        return getattr(getattr(block, self.mlp), self.experts) if self.moe else None

    def lm_head_tied(self, model) -> bool:
        """True when the output projection is the input embedding (one tensor, listed under the embedding)."""
        out = model.get_output_embeddings()
        return out is not None and out.weight is model.get_input_embeddings().weight

    # ------------------------------------------------ chat

    def messages(self, prompt: str, system: str | None = None) -> list[dict]:
        """One user turn, after a system turn where the template has one, else with the system text prepended."""
        if not system:
            return [{"role": "user", "content": prompt}]
        if self.system_role:
            return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return [{"role": "user", "content": f"{system}\n\n{prompt}"}]

    def refusal_ids(self, tokenizer, refusal: str) -> list[int]:
        """Token ids of `refusal` as the start of an assistant turn (no BOS or other special tokens)."""
        ids = tokenizer(refusal, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"refusal {refusal!r} encodes to no tokens with the {self.family} tokenizer")
        return ids


_MOE = {"num_experts_per_tok": 2}
ARCHS: dict[str, Arch] = {a.family: a for a in (
    Arch("llama", "LlamaConfig"),
    Arch("qwen2", "Qwen2Config"),
    Arch("qwen3", "Qwen3Config", {"head_dim": 16}),
    Arch("mistral", "MistralConfig"),
    Arch("gemma2", "Gemma2Config", {"head_dim": 16}, ties_lm_head=True, system_role=False),
    Arch("qwen2_moe", "Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 64,
                                         "shared_expert_intermediate_size": 64, **_MOE},
         experts="experts", shared_expert="shared_expert", routers=("gate", "shared_expert_gate")),
    Arch("qwen3_moe", "Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 64, "head_dim": 16, **_MOE},
         experts="experts", routers=("gate",)),
    Arch("mixtral", "MixtralConfig", {"num_local_experts": 4, **_MOE}, experts="experts", routers=("gate",)),
    Arch("olmoe", "OlmoeConfig", {"num_experts": 4, **_MOE}, experts="experts", routers=("gate",)),
)}
FAMILIES = tuple(ARCHS)


def get(family: str) -> Arch:
    if family not in ARCHS:
        raise ValueError(f"model family {family!r} has no adapter; supported: {', '.join(FAMILIES)}")
    return ARCHS[family]


def is_moe(family: str) -> bool:
    """True for a supported mixture-of-experts family (False for unknown families)."""
    return family in ARCHS and ARCHS[family].moe


# ------------------------------------------------ parameter names, whatever the family

def _alt(names) -> str:
    return "|".join(sorted({re.escape(n) for n in names if n}))


def _patterns() -> list[tuple[re.Pattern, Part, str | None]]:
    """(pattern on a parameter name, part, component) built from every entry's module names."""
    archs = ARCHS.values()
    attn, mlp = _alt(a.attention for a in archs), _alt(a.mlp for a in archs)
    experts, shared = _alt(a.experts for a in archs), _alt(a.shared_expert for a in archs)
    routers = _alt(r for a in archs for r in a.routers)
    proj = lambda table: f"(?P<proj>{_alt(table)})"  # noqa: E731
    return [
        (re.compile(rf"\.(?:{mlp})\.(?:{routers})\.weight$"), Part.ROUTER, "router"),
        (re.compile(rf"\.(?:{attn})\.{proj(ATTENTION_PROJECTIONS)}\.weight$"), Part.ATTENTION, None),
        (re.compile(rf"\.(?:{mlp})\.(?:{shared})\.{proj(MLP_PROJECTIONS)}\.weight$"), Part.SHARED_EXPERT, None),
        (re.compile(rf"\.(?:{mlp})\.(?:{experts})\.{proj(EXPERT_PROJECTIONS)}$"), Part.EXPERT, None),
        (re.compile(rf"\.(?:{mlp})\.{proj(MLP_PROJECTIONS)}\.weight$"), Part.MLP, None),
    ]


_PATTERNS = _patterns()
_TABLES = {Part.ATTENTION: ATTENTION_PROJECTIONS, Part.MLP: MLP_PROJECTIONS,
           Part.SHARED_EXPERT: MLP_PROJECTIONS, Part.EXPERT: EXPERT_PROJECTIONS}
_LAYER = re.compile(rf"\.(?:{_alt(a.layers.rsplit('.', 1)[-1] for a in ARCHS.values())})\.(\d+)\.")


def classify(name: str) -> tuple[Part, str] | None:
    """(part, component) of a decoder-block weight's parameter name; None for embeddings, norms, biases, lm_head.
    Components: q/k/v/o, gate/up/down (dense MLP and shared expert), gate_up/down (fused experts), router."""
    if _LAYER.search(name) is None:
        return None
    for pattern, part, comp in _PATTERNS:
        m = pattern.search(name)
        if m:
            return part, comp or _TABLES[part][m.group("proj")]
    return None


def component(name: str) -> str | None:
    found = classify(name)
    return found[1] if found else None


def part(name: str) -> Part | None:
    found = classify(name)
    return found[0] if found else None


def linear_targets() -> str:
    """A peft `target_modules` regex for every block's nn.Linear projection (attention, dense MLP, shared expert),
    in any family; fused experts are not Linear modules and routers are not projections."""
    layers = _alt(a.layers.rsplit(".", 1)[-1] for a in ARCHS.values())
    return rf".*\.(?:{layers})\.\d+\..*\b({_alt(ATTENTION_PROJECTIONS | MLP_PROJECTIONS)})"


def layer_index(name: str) -> int | None:
    """Decoder block of a parameter name, None outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
