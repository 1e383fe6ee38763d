# %% [md]
# # 05 · Validate: does removing a region change safety more than removing a random one?
#
# A region earns the name "safety region" only if removing it changes safety behaviour. For every model and
# method, the region of each validated dataset (the refined one by default, `validate.variant`) is removed at the
# method's own granularity — weights zeroed (SNIP, Wanda, NLSR's base-weight projection), neurons deactivated,
# layers scaled by `validate.layer_alpha` — and compared with a **random region of the same size and
# granularity** (same count per weight matrix, per layer and neuron type, or the same number of layers).
#
# * **Outcomes**: each greedy response to a held-out (eval split) harmful prompt, disjoint from the identification
#   prompts, is refused, complied or degenerate (empty, repetitive or incoherent; `evaluation.is_degenerate`).
#   **ASR** counts only coherent compliance; the degenerate rate is shown beside it, both with Wilson 95% intervals.
# * **Utility**: per held-out Alpaca prompt, exp(mean token log-likelihood) that the ablated model assigns to the
#   *intact* model's greedy answer (1 / perplexity; 1.0 = certain); the mean with a bootstrap 95% interval, and
#   its ratio to the intact model's. It falls when an ablation breaks the model.
# * **Region vs random**: ASR(region) − ASR(random) on the same prompts, exact McNemar test with Newcombe's
#   paired 95% interval, and the interval with any one prompt flipped that the report's verdict reads
#   (metrics.json "paired").
# * **Controls that could fail**: several random draws for the primary region (first method × first dataset), with
#   their spread; an **importance-matched** random region (the same count per matrix and per decile of a utility
#   importance, Wanda scores on the calibration Alpaca examples), which a region that is merely made of important
#   entries would not beat; and a **positive control**, the refusal direction (Arditi et al.: difference in means
#   of the residual stream on harmful vs harmless prompts) ablated from every block. If this validation cannot
#   detect the positive control at its n and generation length, a null region result is "not testable here".
# * **n from power**: the prompts per set come from an exact McNemar power calculation on the discordance of the
#   earlier 800-prompt run (docs/methods.md, "Power"); the intact model's responses are generated once and paired
#   with every condition.
#
# A safety region in Wei et al.'s sense raises ASR well above the random control while keeping utility close to it.
# %% [params]
params = {}
# %%
import pandas as pd
import torch
from IPython.display import display

from saferegions.stages import validate

cfg = validate.config.parse(params)
v = cfg.validate
torch.manual_seed(cfg.run.seed)
display(validate.params_table(params))
display(validate.table(pd.DataFrame(validate.config.deviations(v, "validate")),
                       caption="CPU reductions in this run (paper-scale value beside each)"))
per_set, plan = validate.sample_size(v)
if plan is not None:
    display(validate.table(pd.DataFrame([plan.as_dict()]), index=False,
                           caption="Sample size from power (exact McNemar): n required for the effect, n run, and "
                                   "the minimal detectable effect at that n"))
harmful, util_prompts = validate.prompts(cfg)
print(f"{len(harmful)} held-out harmful prompts ({per_set} per set) from {v.eval_sets}; "
      f"{len(util_prompts)} Alpaca eval prompts")
# %%
metrics, reference, frame, gens = validate.run(cfg, harmful, util_prompts)
# %% [md]
# ## ASR, degenerate rate and utility: region vs random region of the same size
# Error bars: Wilson 95% (ASR, degenerate rate), percentile bootstrap 95% over prompts (utility).
# %%
long = validate.bar_frame(frame, reference)
display(validate.table(long[["model", "method", "dataset", "ablation", "n", "asr", "asr_ci", "degenerate_rate",
                             "degenerate_rate_ci", "utility", "utility_ci", "n_utility"]], index=False))
display(validate.table(pd.DataFrame([{"model": m, "method": meth, "dataset": d, "utility_ratio": e["utility_ratio"],
                       **{f"paired_{k}": e["paired"][k] for k in ("n", "effect", "ci", "ci_one_flip", "p")}}
                      for m, meth, d, e in validate.conditions(metrics)]), intervals={"paired_effect": "paired_ci"},
                       index=False, caption="Region vs random, paired on the same prompts (ASR difference)"))
display(validate.table(validate.controls_frame(metrics), index=False,
                       caption="ASR(region) − ASR(control) per control, paired on the same prompts, with the "
                               "minimal detectable effect (80% power) at this n and discordance"))
display(validate.table(validate.positive_control_frame(metrics), index=False,
                       caption="Positive control: the refusal direction ablated, ASR rise over the intact model; "
                               "'detected' = its interval clears the region claim's threshold"))
fig = validate.plots.error_bars(long, "condition", "ablation",
                                {"asr": "ASR (held-out harmful)", "degenerate_rate": "degenerate rate",
                                 "utility": "utility"},
                                f"Ablating each method's {v.variant} region vs a random region of equal size")
validate.plots.save(fig, validate.RESULTS / "figures" / "validate.png")
# %% [md]
# ## Examples: the same prompt, unablated and with each region removed
# %%
with pd.option_context("display.max_colwidth", 100):
    display(validate.table(validate.same_prompt(gens)))
# %% [md]
# ## Examples per outcome: what counted as complied, refused or degenerate
# %%
with pd.option_context("display.max_colwidth", 100):
    display(validate.table(validate.examples(gens)))
# %% [md]
# ## The degenerate rule, checked on outputs labelled by construction
# Coherent answers other models wrote, the aligned model's own answers in other languages, their truncations at the
# stages' lengths (coherent), word salad, loops and empty outputs (degenerate). False positive: coherent called
# degenerate; false negative: degenerate passed (and so counted as complied or refused). Wilson 95% intervals.
# The evaluating stages apply the rule named `applied`.
# %%
display(validate.table(validate.degenerate_rule_frame(metrics), index=False))
# %%
validate.write_metrics(metrics, reference)
