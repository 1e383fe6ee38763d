"""Where ESI sits in the architecture (docs/methods.md §4.4): per-prompt ESI mass per layer and matrix kind of
the decoder blocks, the paper's dense-model claim as parts (V; the MLPs; the middle third of the layers), and a
null profile from a non-safety objective.

A prompt's ESI mass in a cell is Σ_{W in cell} Σ_i |∂S_x/∂θ_i| · σ_W. Per-prompt sums are what a bootstrap over
prompts needs: the region's own |Σ_x ∂S_x/∂θ| has no per-prompt split, and per-prompt gradients of a 0.5B model
are 2 GB each, so only these sums are kept. The profile's denominator is the blocks' matrices alone; lm_head,
embeddings, norms, biases and routers are rows of their own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .. import evidence
from ..arch import Part, classify, layer_index
from ..hooks import grad_only_for
from ..models import arch_of
from . import esi

MLP_PARTS = (Part.MLP.value, Part.EXPERT.value, Part.SHARED_EXPERT.value)   # dense MLP, routed and shared experts
ROW = "row"   # the part of every parameter outside the blocks' matrices
COMPONENTS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Cell:
    """Where a weight's ESI mass is booked: a block matrix kind of one layer (part: attention, mlp, expert,
    shared_expert), or a row outside the profile (part 'row'; component lm_head, embed, norm, bias, router,
    other)."""
    layer: int | None
    part: str
    component: str

    @property
    def block(self) -> bool:
        return self.part != ROW


def _row(name: str, found) -> str:
    if found is not None and found[0] is Part.ROUTER:
        return "router"
    if name.endswith(".bias"):
        return "bias"
    if "lm_head" in name:
        return "lm_head"
    if "embed" in name:
        return "embed"
    if "norm" in name or name.endswith("ln_f.weight"):
        return "norm"
    return "other"


def split(name: str, t: torch.Tensor) -> list[tuple[Cell, torch.Tensor]]:
    """(cell, view) pieces of a parameter (or its gradient): fused experts' gate_up [E, 2I, H] = gate rows :I, up
    rows I:; everything else is one piece."""
    found = classify(name)
    if found is None or found[0] is Part.ROUTER:
        return [(Cell(layer_index(name), ROW, _row(name, found)), t)]
    part, comp = found
    layer = layer_index(name)
    if comp == "gate_up":
        half = t.shape[1] // 2
        return [(Cell(layer, part.value, "gate"), t[:, :half]), (Cell(layer, part.value, "up"), t[:, half:])]
    return [(Cell(layer, part.value, comp), t)]


def cells(model) -> tuple[list[Cell], np.ndarray]:
    """Every cell of the model in a fixed order (blocks by layer, part, component; then the rows) and its
    entries."""
    numel: dict[Cell, int] = {}
    for name, p in model.named_parameters():
        for cell, piece in split(name, p.detach()):
            numel[cell] = numel.get(cell, 0) + piece.numel()
    order = sorted(numel, key=lambda c: (not c.block, -1 if c.layer is None else c.layer, c.part,
                                         COMPONENTS.index(c.component) if c.component in COMPONENTS else 0,
                                         c.component))
    return order, np.array([numel[c] for c in order], dtype=np.int64)


def _embedding_by_output(model) -> tuple[str, torch.nn.Embedding] | None:
    """(name, module) of an untied plain nn.Embedding input embedding, whose weight gradient is cheaper to book
    from the gradient of its output (a [positions × hidden] tensor, not a dense [vocab × hidden] one)."""
    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding or arch_of(model).lm_head_tied(model):
        return None
    return next(n for n, p in model.named_parameters() if p is emb.weight), emb


@contextlib.contextmanager
def cell_mass(model, order: list[Cell]):
    """Inside: every parameter gets a gradient, which is dropped after its backward (nothing accumulates).
    Yield `take()`: the per-cell Σ|g|·σ_W (fp64 array in `order`) of the gradients backpropagated since the last
    call. A tensor hook sees each backward's own gradient, so one backward per prompt gives that prompt's row.
    An untied input embedding's row is booked from its output's gradient: ∂L/∂E[t] = Σ over the positions
    holding token t (the padding index excluded, as nn.Embedding's backward does) of ∂L/∂output."""
    index = {c: i for i, c in enumerate(order)}
    current = np.zeros(len(order))
    params = dict(model.named_parameters())
    sigma = {n: esi.tensor_std(p) for n, p in params.items()}
    by_output = _embedding_by_output(model)

    def mass(name):
        def hook(g):
            for cell, piece in split(name, g.detach()):
                current[index[cell]] += float(torch.linalg.vector_norm(piece, 1, dtype=torch.float32)) * sigma[name]
        return hook

    def embedding_output(module, args, out):
        name, ids = by_output[0], args[0].reshape(-1)
        keep = ids != module.padding_idx if module.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        tokens, where = ids[keep].unique(return_inverse=True)

        def hook(g):
            rows = torch.zeros(len(tokens), g.shape[-1], dtype=torch.float32, device=g.device)
            rows.index_add_(0, where, g.detach().reshape(-1, g.shape[-1])[keep].float())
            current[index[split(name, module.weight)[0][0]]] += float(torch.linalg.vector_norm(rows, 1)) * sigma[name]
        out.requires_grad_(True)
        out.register_hook(hook)

    def drop(p):
        p.grad = None

    def take() -> np.ndarray:
        out = current.copy()
        current[:] = 0.0
        return out

    handles = []
    weights = {n: p for n, p in params.items() if by_output is None or n != by_output[0]}
    try:
        with grad_only_for(model, weights.values()):
            for n, p in weights.items():
                handles += [p.register_hook(mass(n)), p.register_post_accumulate_grad_hook(drop)]
            if by_output is not None:
                handles.append(by_output[1].register_forward_hook(embedding_output))
            yield take
    finally:
        for h in handles:
            h.remove()


def prompt_masses(model, tokenizer, soft_judge, prompts: list[str], order: list[Cell], **kw) -> np.ndarray:
    """[prompts × cells] ESI mass of each prompt's own gradient (`esi.prompt_losses` with `kw`; a prompt whose
    response has no token to score gets a row of zeros)."""
    rows = []
    with cell_mass(model, order) as take:
        for loss in esi.prompt_losses(model, tokenizer, soft_judge, prompts, **kw):
            if loss is not None:
                loss.backward()
            rows.append(take())
    return np.array(rows).reshape(len(rows), len(order))


def safety_and_null(model, tokenizer, soft_judge, harmful: list[str], benign: list[str], e, transfer_M=None,
                    progress: bool = False) -> "Masses":
    """The safety profile (the primary settings of `e`, an EsiCfg, on the harmful prompts) and the null profile
    ('response_likelihood': the model's own greedy responses to the benign prompts); one generation pass."""
    order, numel = cells(model)
    gen = esi.respond(model, tokenizer, harmful + benign, e.max_new_tokens, e.system_prompt, e.gen_batch_size,
                      progress)
    common = dict(max_new_tokens=e.max_new_tokens, system=e.system_prompt, progress=False)
    safety = prompt_masses(model, tokenizer, soft_judge, harmful, order, variant=e.variant, objective=e.objective,
                           transfer_M=transfer_M, generated=gen[:len(harmful)], **common)
    null = prompt_masses(model, tokenizer, None, benign, order, objective="response_likelihood",
                         generated=gen[len(harmful):], **common)
    a = arch_of(model)
    return Masses(order, numel, safety, null, len(a.blocks(model)), a.lm_head_tied(model))


def third(layer: int, n_layers: int) -> int:
    """0, 1, 2: the third of the stack a layer's centre falls in (symmetric: 24 layers → 0-7, 8-15, 16-23)."""
    return min(2, int(3 * (layer + 0.5) / n_layers))


def part_masks(order: list[Cell], n_layers: int) -> dict[str, np.ndarray]:
    """The claim's parts as boolean masks over `order` (rows are never members): V; the MLPs (dense, routed and
    shared experts); every block matrix of the middle third; the MLPs of the last third (the MoE claim)."""
    def mask(pred):
        return np.array([c.block and pred(c) for c in order])
    return {"v": mask(lambda c: c.part == Part.ATTENTION.value and c.component == "v"),
            "mlp": mask(lambda c: c.part in MLP_PARTS),
            "middle_third": mask(lambda c: third(c.layer, n_layers) == 1),
            "late_third_mlp": mask(lambda c: c.part in MLP_PARTS and third(c.layer, n_layers) == 2)}


PART_DEFS = {
    "v": "value projections (V) of the blocks",
    "mlp": "MLP matrices (gate + up + down; routed and shared experts) of the blocks",
    "middle_third": "every block matrix of the middle third of the layers",
    "late_third_mlp": "MLP matrices of the last third of the layers (the MoE claim)",
}
NULL_OBJECTIVE = "response_likelihood: log p(the model's own greedy response | benign prompt)"
TEST = "percentile bootstrap over prompts (safety and null resampled independently); p: bootstrap tail at 0"


def _share(x: np.ndarray, member: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Share of the pooled mass of the rows `idx` (any leading batch shape) in the member cells."""
    idx = idx.astype(np.int64)
    return x[:, member].sum(1)[idx].sum(-1) / x.sum(1)[idx].sum(-1)


def _estimate(stat, samples, effect: float, seed: int) -> evidence.Estimate:
    """Percentile-bootstrap interval over the samples' prompts (each resampled on its own) and the tail p at 0."""
    n, test = len(samples[0]), TEST if len(samples) > 1 else "percentile bootstrap"
    if min(len(s) for s in samples) < 2:
        return evidence.Estimate(n, effect, (float("nan"), float("nan")), test)
    res = stats.bootstrap(samples, stat, paired=False, vectorized=True, confidence_level=evidence.LEVEL,
                          n_resamples=evidence.RESAMPLES, method="percentile", rng=np.random.default_rng(seed))
    d = res.bootstrap_distribution
    tail = min((d <= 0).sum(), (d >= 0).sum())
    p = min(1.0, 2 * (tail + 1) / (len(d) + 1))
    return evidence.Estimate(n, effect, (float(res.confidence_interval.low), float(res.confidence_interval.high)),
                             test, p)


def part_estimates(safety: np.ndarray, null: np.ndarray, member: np.ndarray, entry_share: float,
                   seed: int = 0) -> dict:
    """One part: `effect` = its share of the safety ESI mass minus its share of the null mass (both pooled over
    prompts, blocks only), 95% interval and p from resampling each objective's prompts; beside it each profile's
    share minus the part's share of the entries, with its own interval."""
    s_idx, n_idx = np.arange(len(safety), dtype=float), np.arange(len(null), dtype=float)
    s_share, n_share = float(_share(safety, member, s_idx)), float(_share(null, member, n_idx))
    diff = _estimate(lambda i, j, axis=-1: _share(safety, member, i) - _share(null, member, j), (s_idx, n_idx),
                     s_share - n_share, seed)
    vs = {key: _estimate(lambda i, axis=-1, x=x: _share(x, member, i) - entry_share, (idx,), share - entry_share,
                         seed).as_dict()
          for key, x, idx, share in (("safety_vs_entries", safety, s_idx, s_share),
                                     ("null_vs_entries", null, n_idx, n_share))}
    return {**diff.as_dict(), "n_null": len(null), "safety_share": s_share, "null_share": n_share,
            "entry_share": entry_share, "enrichment": s_share / entry_share if entry_share else None, **vs}


@dataclass
class Masses:
    """Per-prompt ESI mass per cell of one model, for the safety objective and the null objective."""
    order: list[Cell]
    numel: np.ndarray
    safety: np.ndarray            # [safety prompts × cells]
    null: np.ndarray              # [null prompts × cells]
    n_layers: int
    lm_head_tied: bool = False    # the embedding row then holds lm_head's gradient too

    @property
    def block(self) -> np.ndarray:
        return np.array([c.block for c in self.order])

    def frame(self) -> pd.DataFrame:
        """Long table: objective, prompt, layer, part, component, numel, mass (artifacts/esi/<role>/masses.csv)."""
        rows = []
        for objective, x in (("safety", self.safety), ("null", self.null)):
            for i, row in enumerate(x):
                rows += [{"objective": objective, "prompt": i, "layer": c.layer, "part": c.part,
                          "component": c.component, "numel": int(k), "mass": float(m)}
                         for c, k, m in zip(self.order, self.numel, row, strict=True)]
        return pd.DataFrame(rows)

    def _shares(self, keys: list) -> pd.DataFrame:
        """Per key (over the block cells): share of the entries, of the safety and of the null ESI mass."""
        df = pd.DataFrame({"key": keys, "entry_share": self.numel, "safety_share": self.safety.sum(0),
                           "null_share": self.null.sum(0)})[self.block]
        out = df.groupby("key", sort=False).sum()
        return out / out.sum()

    def component_table(self) -> pd.DataFrame:
        """Per block component (part:component): share of the entries, of the safety and of the null ESI mass."""
        return self._shares([f"{c.part}:{c.component}" for c in self.order])

    def layer_table(self) -> pd.DataFrame:
        """Per layer: share of the block entries, of the safety and of the null ESI mass."""
        return self._shares([c.layer for c in self.order]).rename_axis("layer")

    def rows(self) -> dict[str, dict]:
        """Each row outside the profile: its entries and its pooled ESI mass, both relative to the blocks'."""
        b = self.block
        out = {}
        for i, c in enumerate(self.order):
            if c.block:
                continue
            r = out.setdefault(c.component, {"numel": 0, "safety": 0.0, "null": 0.0})
            r["numel"] += int(self.numel[i])
            r["safety"] += float(self.safety[:, i].sum())
            r["null"] += float(self.null[:, i].sum())
        blocks = {"numel": int(self.numel[b].sum()), "safety": float(self.safety[:, b].sum()),
                  "null": float(self.null[:, b].sum())}
        return {k: {"numel": r["numel"], "numel_vs_blocks": r["numel"] / blocks["numel"],
                    "safety_mass_vs_blocks": r["safety"] / blocks["safety"] if blocks["safety"] else None,
                    "null_mass_vs_blocks": r["null"] / blocks["null"] if blocks["null"] else None}
                for k, r in out.items()}

    def metrics(self, profile: pd.DataFrame | None = None, safety_objective: str = "", null_dataset: str = "",
                seed: int = 0) -> dict:
        """The parts (each `part_estimates`, or a reason where the part has no member), the rows, the
        component and layer shares; with the primary region's `profile`, its block components' enrichment."""
        b = self.block
        safety, null, numel = self.safety[:, b], self.null[:, b], self.numel[b]
        order = [c for c in self.order if c.block]
        parts = {}
        for name, member in part_masks(order, self.n_layers).items():
            if not member.any():
                parts[name] = {"n": 0, "effect": None, "ci": [None, None], "test": None,
                               "reason": f"no block matrix is in this part ({self.n_layers} layers)"}
                continue
            parts[name] = {"definition": PART_DEFS[name],
                           **part_estimates(safety, null, member, float(numel[member].sum() / numel.sum()), seed)}
        return {"parts": parts, "rows": self.rows(), "n_prompts": len(self.safety), "n_null_prompts": len(self.null),
                "safety_objective": safety_objective, "null_objective": NULL_OBJECTIVE, "null_dataset": null_dataset,
                "top_region": top_region_enrichment(profile) if profile is not None else None,
                "n_layers": self.n_layers, "block_numel": int(numel.sum()), "lm_head_tied": self.lm_head_tied,
                "middle_layers": [layer for layer in range(self.n_layers) if third(layer, self.n_layers) == 1],
                "components": self.component_table().to_dict("index"),
                "layers": {str(k): v for k, v in self.layer_table().to_dict("index").items()}}


def top_region_enrichment(profile: pd.DataFrame) -> dict[str, dict]:
    """Per block component: share of the top-k region's block entries over share of the block entries (> 1:
    over-represented), from the primary region; lm_head and other rows left out. A point value: the region
    comes from the summed gradient, which a bootstrap over prompts would have to recompute."""
    block = profile[profile.layer.notna()]
    sums = block.groupby("component")[["region_count", "numel"]].sum()
    shares = sums / sums.sum()
    return {c: {"region_share": float(shares.region_count[c]), "entry_share": float(shares.numel[c]),
                "enrichment": float(shares.region_count[c] / shares.numel[c])}
            for c in esi.COMPONENT_ORDER if c in shares.index}


def part_text(name: str, v: dict) -> str:
    if v["effect"] is None:
        return f"{name} not estimable ({v['reason']})"
    return (f"{name} {v['effect']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] (safety {v['safety_share']:.3f}, "
            f"null {v['null_share']:.3f}, entries {v['entry_share']:.3f})")


def part_table(architecture: dict) -> pd.DataFrame:
    """One row per part of an `architecture` metrics entry: shares of the safety mass, the null mass and the
    entries, the difference with its interval, and the safety profile against the entries."""
    return pd.DataFrame([{"part": part, "n": v["n"], "safety share": v.get("safety_share"),
                          "null share": v.get("null_share"), "entry share": v.get("entry_share"),
                          "safety − null": v["effect"], "95% CI": v["ci"], "p": v.get("p"),
                          "safety − entries": (v.get("safety_vs_entries") or {}).get("effect"),
                          "its CI": (v.get("safety_vs_entries") or {}).get("ci")}
                         for part, v in architecture["parts"].items()])


def tables(roles: dict, metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per role and part, long per-layer shares per role) of the roles whose `.architecture` ran."""
    arch = {role: res.architecture for role, res in roles.items() if res.architecture is not None}
    parts = [part_table(metrics[role]["architecture"]).assign(model=role) for role in arch]
    layers = [a.layer_table().reset_index().melt("layer", var_name="measure", value_name="share").assign(model=role)
              for role, a in arch.items()]
    return (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(),
            pd.concat(layers, ignore_index=True) if layers else pd.DataFrame())
