# %% [md]
# # 05 · Validate: does removing a region change safety more than removing a random one?
#
# A region earns the name "safety region" only if removing it changes safety behaviour. For every model and
# method, the region of each validated dataset (the refined one by default, `validate.variant`) is removed at the
# method's own granularity — weights zeroed (SNIP, Wanda, NLSR's base-weight projection), neurons deactivated,
# layers scaled by `validate.layer_alpha` — and compared with a **random region of the same size and
# granularity** (same count per weight matrix, per layer and neuron type, or the same number of layers).
#
# * **ASR**: keyword judge on greedy responses to held-out (eval split) harmful prompts, disjoint from the
#   identification prompts. Higher = the ablation removed refusals.
# * **Utility**: exp(mean token log-likelihood) that the ablated model assigns to the *intact* model's greedy
#   answers to held-out Alpaca prompts (1 / perplexity; 1.0 = certain). It falls when an ablation breaks the model,
#   which the keyword judge alone would count as "complied".
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
display(pd.DataFrame(validate.config.deviations(v, "validate")).style.set_caption(
    "CPU reductions in this run (paper-scale value beside each)"))
harmful, util_prompts = validate.prompts(cfg)
print(f"{len(harmful)} held-out harmful prompts from {v.eval_sets}; {len(util_prompts)} Alpaca eval prompts")
# %%
metrics, reference, frame, gens = validate.run(cfg, harmful, util_prompts)
# %% [md]
# ## ASR and utility: region vs random region of the same size
# The dashed line is the unablated model.
# %%
display(pd.DataFrame(reference).T)
display(frame[["model", "method", "dataset", "density", "asr_region", "asr_random", "utility_region",
               "utility_random"]].style.format(precision=3))
ref = next(iter(reference.values()))
fig = validate.plots.bar_panels(validate.long_frame(frame), "condition", "ablation",
                                {"ASR": "ASR (held-out harmful)", "utility": "utility"},
                                f"Ablating each method's {v.variant} region vs a random region of equal size",
                                refs={"ASR": ref["asr"], "utility": ref["utility"]}, ref_label="unablated")
validate.plots.save(fig, validate.RESULTS / "figures" / "validate.png")
# %% [md]
# ## Examples: the same prompt, unablated and with each region removed
# %%
with pd.option_context("display.max_colwidth", 100):
    display(validate.same_prompt(gens))
# %%
validate.write_metrics(metrics, reference)
