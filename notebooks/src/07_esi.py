# %% [md]
# # 07 · ESI: which weights does a judge say safety depends on, and does noise there break refusals?
#
# Paper 2 (arXiv:2604.08297) scores every weight by its **Expected Safety Impact**
#
#     ESI_i = |g_i| · σ_W,   g = Σ_prompts ∂S_x/∂θ,   σ_W = std of the whole matrix W holding θ_i,
#
# where S_x is a judge's "safe" score of the model's own greedy response to harmful prompt x. The response is
# discrete, so S is made differentiable in two halves (docs/methods.md §4.2): the judge reads the response as soft tokens
# and returns ∂(−safe)/∂tokens; a sparse map carries that gradient from the judge's vocabulary to the model's;
# the model's (Gumbel-)softmax response probabilities are pulled along it. The reference code's quirks are
# switches: variant `faithful` reproduces them, `fixed` repairs them (BOS alignment, gradient w.r.t.
# probabilities instead of near-one-hot logits, no Gumbel noise, fp32 accumulation).
#
# This notebook, for each model role (`esi.models`; SPA uses the aligned model's region, SET the unaligned one's):
#
# 1. the **primary region** — global top `esi.top_frac` (1%) of all parameters by ESI, from the default variant,
#    judge and objective — and its bottom-k, saved as `artifacts/esi/<role>/{topk,bottomk}.safetensors`;
# 2. how much the region moves when one setting changes: faithful ↔ fixed, another judge (offline: the learned
#    MiniLM judge; paper profile: Llama-Guard-3 too), the `refusal_likelihood` objective (log p of a stock refusal,
#    no judge) — IoU beside its chance value;
# 3. where it sits: layer × component heatmaps and component shares (q/k/v/o, gate/up/down, lm_head), and the
#    paper's dense-model claim (V; the MLPs; the middle third of the layers) tested against a null objective;
# 4. whether it matters: Gaussian noise (0.38·σ_W) on the top-k, bottom-k and a random-k region, sampled
#    responses to held-out harmful prompts, ASR by the keyword judge;
# 5. beyond the paper: ESI regions from several safety datasets, their pairwise IoU vs chance, and their overlap
#    with paper 1's SNIP and Wanda regions of the same model and dataset.
# %% [params]
params = {}
# %%
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

from saferegions.stages import esi
from saferegions.stages.esi import config, plots, write_jsonl

cfg = config.parse(params)
e = cfg.esi
torch.manual_seed(cfg.run.seed)
OUT, RESULTS = Path("artifacts/esi"), Path("results/esi")
FIG = RESULTS / "figures"
PROMPTS = "artifacts/data/prompts.jsonl"
display(esi.params_table(params))
display(esi.table(pd.DataFrame(config.deviations(e, "esi")),
                  caption="CPU reductions in this run (paper-scale value beside each)"))
soft_judges = esi.load_soft_judges(cfg, esi.needed_judges(e))
display(esi.table(esi.plan_table(e), caption="Regions computed (the first of each role is the primary)"))
# %% [md]
# ## Run
# One model at a time: a greedy generation pass shared by every judge-guided region, one gradient pass per
# region, selection, the architecture profile, then the perturbation check. Regions are kept packed.
# %%
result = esi.run(cfg, soft_judges, OUT, "artifacts/identify", PROMPTS)
metrics = result.metrics
# %% [md]
# ## The primary region's inputs: responses and judge scores
# The judge's "safe" score of each greedy response (learned judge: the logistic head's refusal logit, > 0 reads
# as a refusal; guard: the 'safe' logit). ESI pushes this score: weights with a large |∂safe/∂θ|·σ_W are those
# a small change of which would move the judge's verdict most.
#
# **Judge token coverage**: the share of the response tokens whose own id gets a nonzero gradient from S after
# the vocabulary transfer (docs/methods.md §5.7). The learned judge's MiniLM tokenizer is WordPiece and uncased,
# so a transfer without the WordPiece rule reaches only punctuation; near 1 means S acts on the whole
# response.
# %%
with pd.option_context("display.max_colwidth", 90):
    display(esi.table(result.rows("records")))
for role, m in metrics.items():
    cov = m["judge_token_coverage"]
    print(f"{role}: judge {m['judge']!r}, judge token coverage "
          + (f"{cov:.3f}" if cov is not None else "n/a (no judge objective)"))
display(esi.table(esi.region_table(result)))
# %% [md]
# ## Architecture profile: where the top-k sits
# Left: share of the top-k region's entries per layer and component; right: share of the summed ESI (Σ|g|·σ_W).
# Both heatmaps are normalised to sum to 1 over the figure (lm_head has no layer and shows only in the share
# bars). The paper reports value projections and mid-layer MLPs for dense models, late-layer MLP experts for MoE.
# %%
tables, shares = esi.architecture_tables(result)
for (role, value), table in tables.items():
    label = esi.SHARE_MEASURES[value]
    fig = plots.heatmap(table, f"{role}: share of {label} per layer × component", "component", "layer",
                        vmin=0, vmax=None, annot=False, cbar_label=f"share of {label}",
                        figsize=(6, max(3, 0.28 * len(table) + 1.5)))
    plots.save(fig, FIG / f"heatmap_{role}_{value}.png")
display(esi.table(shares.pivot_table(index=["model", "measure"], columns="component", values="share")))
fig = plots.bars(shares[shares.measure == "top-k entries"], "component", "share", "model",
                 "Share of the ESI top-k region per component", "component", "share of top-k entries")
plots.save(fig, FIG / "component_share.png")
# %% [md]
# ## The architecture claim: does safety ESI sit in V, the MLPs and the middle layers beyond a null objective?
# Per prompt, the ESI mass Σ|∂S_x/∂W|·σ_W of each layer and block matrix kind, on `esi.n_mass_prompts` harmful
# prompts (the safety objective of the primary region) and on as many benign prompts under a language-model
# objective (log p of the model's own greedy response: the **null**). Shares are over the blocks' matrices only;
# lm_head, embeddings, norms and biases are rows of their own. Each part's effect is its share of the safety mass
# minus its share of the null mass, with a 95% interval from resampling each objective's prompts; beside it the
# safety share minus the part's share of the entries (docs/methods.md §4.4).
# %%
parts, layers = esi.esi_architecture.tables(result.roles, metrics)
if len(parts):
    display(esi.table(parts, caption="Parts of the claim (blocks only)"))
    for role, rows in layers.groupby("model"):
        fig = plots.lines(rows, "layer", "share", "measure",
                          f"{role}: share of the block entries and of the ESI mass per layer", "layer", "share")
        plots.save(fig, FIG / f"architecture_layers_{role}.png")
    for role, m in metrics.items():
        if m["architecture"]:
            display(esi.table(pd.DataFrame(m["architecture"]["rows"]).T,
                              caption=f"{role}: rows outside the blocks, relative to the blocks"))
            display(esi.table(pd.DataFrame(m["architecture"]["top_region"]).T,
                              caption=f"{role}: the top-k region's block components (enrichment = region share / "
                                      "entry share)"))
else:
    print("the architecture claim did not run for any role (esi.architecture_models)")
# %% [md]
# ## How stable is the region? One setting changed at a time
# IoU with the primary region (global over all ESI-eligible weights); chance = two random regions of these sizes.
# %%
comp = result.rows("comparisons")
display(esi.table(comp))
long = esi.observed_and_chance(comp)
long["comparison"] = long.model + ": primary vs " + long.region
fig = plots.bars(long, "comparison", "value", "kind", "IoU of the primary ESI region with one setting changed",
                 "comparison", "IoU")
plots.save(fig, FIG / "variants_iou.png")
# %% [md]
# ## Perturbation check: noise on the top-k vs the bottom-k vs a random region
# θ ← θ + ε·σ_W·`noise_ratio`, ε ~ N(0, 1), at the region's entries; random = the top-k's per-matrix counts at
# random positions. Sampled responses (temperature, top-p as in the paper) to held-out harmful prompts (eval
# split, disjoint from the ESI prompts); ASR = share judged compliant by the keyword judge. "none" = no noise.
# %%
pert = result.rows("perturbation")
display(esi.table(pert.pivot_table(index="model", columns="condition", values="asr")[list(e.perturb_conditions)],
                  caption="ASR (mean over seeds)"))
fig = plots.bars(pert, "condition", "asr", "model",
                 f"ASR after noise ({e.noise_ratio}·σ_W) on {e.top_frac:.0%} of the parameters",
                 "perturbed region", "ASR (held-out harmful, keyword judge)")
plots.save(fig, FIG / "perturbation.png")
display(esi.table(pd.DataFrame({role: m["perturbation"] for role, m in metrics.items() if m["perturbation"]})))
gens = result.rows("generations")
with pd.option_context("display.max_colwidth", 90):
    display(esi.table(gens[(gens.prompt == gens.prompt.iloc[0]) & (gens.seed == 0)][["model", "condition", "response",
                                                                                    "complied"]], index=False))
# %% [md]
# ## Beyond the paper: does the ESI region depend on the harmful dataset?
# One region per dataset (primary settings, same number of prompts); IoU per pair, against the chance IoU of
# two random regions of this density, and the multi-way IoU of all of them.
# %%
for role, table in result.dataset_tables.items():
    fig = plots.heatmap(table, f"{role}: IoU of ESI regions from different datasets", "dataset", "dataset",
                        fmt=".3f", vmax=None, cbar_label="IoU")
    plots.save(fig, FIG / f"dataset_iou_{role}.png")
display(esi.table(esi.dataset_summary_table(result)))
# %% [md]
# ## Beyond the paper: ESI vs paper 1's SNIP and Wanda regions of the same model and dataset
# Compared in paper 1's space (the q/k/v/o/gate/up/down weights of the blocks; ESI's lm_head entries drop out),
# against paper 1's raw regions (top-q per matrix, before utility refinement).
# %%
if result.method_rows:
    mo = pd.DataFrame(result.method_rows)
    display(esi.table(mo))
    long = esi.observed_and_chance(mo)
    long["pair"] = long.model + " " + long.method + " / " + long.dataset
    fig = plots.bars(long, "pair", "value", "kind", "IoU of ESI regions with SNIP / Wanda regions",
                     "model, method / dataset", "IoU")
    plots.save(fig, FIG / "methods_iou.png")
else:
    print("no paper-1 regions found under artifacts/identify: run the identify stage for the compared roles")
if result.missing:
    print("not found (method not run on that dataset or model):", *result.missing, sep="\n  ")
# %% [md]
# ## Reading this run
# %%
display(Markdown(esi.reading(result, e)))
# %%
write_jsonl(OUT / "generations.jsonl", esi.generation_rows(result))
esi.save_metrics(RESULTS / "metrics.json", metrics)
