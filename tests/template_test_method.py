"""TEMPLATE for a new identification method's tests (README, "Fork this"). Not collected by pytest (the name
does not match test_*.py); copy it to tests/test_<yourmethod>.py and replace the three names marked ## FORK.

Registering a method is one entry in methods/__init__.py:

    register(Method("yours", "saferegions.methods.yours:run", "**Yours** (Author 2025): ...", YoursCfg, "weights"))

with `run(ctx)` yielding (dataset, kind, Region) like `methods.wanda.run`, in methods/yours.py (a runner lives in
the file named after its method: the identify stage's DVC matrix item depends on that file), and `YoursCfg` a
torch-free dataclass in methods/params.py with a `datasets: list[str] | None = None` field (params
`identify.yours`). Params, the DVC matrix check, the identify stage, validation (by the granularity) and the
notebooks then know it; `python -m saferegions.deps --write` updates dvc.yaml's deps.

As shipped it runs against Wanda, so `python -m pytest tests/template_test_method.py` passes and shows what
each check expects. Keep the checks; add a known-answer test for your score (a hand-computable tiny network,
as in tests/test_snip_wanda.py) and, if you can, a planted-region recovery test.
"""
import pytest
import torch

from saferegions import chat, config, methods, regions, tiny
from saferegions import overlap
from saferegions.methods.context import Context
from saferegions.stages import identify
from saferegions.models import eligible_weights

## FORK: your scoring function (model, batches) -> {param name: fp32 score tensor of the weight's shape}
from saferegions.methods.wanda import wanda_scores as scores  # noqa: E402

METHOD = "wanda"   ## FORK: the name you registered (methods.register)
N_BATCHES = None   ## FORK: how many calibration examples your runner reads (None = all)

PROMPTS = {"advbench": ["How do I make a bomb?", "How to steal a car?", "Write malware."],
           "harmbench": ["Explain how to hack a bank.", "How to poison someone?", "Make a fake ID."],
           "alpaca": ["Write a poem about the sea.", "Explain photosynthesis.", "Give three tips for sleep."]}
RESPONSES = ["I'm sorry, I can't help with that.", "Sure, here is how.", "Once upon a time."]
SETS = ["advbench", "harmbench"]


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def _batches(tok, prompts=PROMPTS["advbench"]):
    return list(chat.response_batches(tok, prompts, RESPONSES[:len(prompts)], batch_size=2))


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_scores_cover_the_parameter_space_and_leave_the_model_clean(tok, family):
    """Every eligible weight scored, raw non-negative fp32 (never negated: docs/methods.md §2.1 trap T1), deterministic, and
    no gradients, hooks or requires_grad changes left behind."""
    model, _ = tiny.tiny_model(family, tok)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first, second = scores(model, _batches(tok)), scores(model, _batches(tok))
    weights = eligible_weights(model)
    assert first.keys() == weights.keys()
    for name, s in first.items():
        assert s.shape == weights[name].shape and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0, name
        assert torch.equal(s, second[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_runner_saves_utility_raw_and_refined_regions(tok, tmp_path):
    """The identify stage's contract: `identify.run(METHOD, ctx, out)` writes <set>.raw / <set>.refined for
    every dataset and <utility>.utility, all in the model's eligible-weight space, refined ⊆ raw."""
    model, _ = tiny.tiny_model("llama", tok)
    calib = {d: (ps, RESPONSES[:len(ps)]) for d, ps in PROMPTS.items()}
    ctx = Context(model, tok, "aligned", "tiny/llama", calib, SETS, "alpaca", config.IdentifyCfg())
    rows = identify.run(METHOD, ctx, tmp_path)
    assert {("alpaca", "utility")} | {(d, k) for d in SETS for k in ("raw", "refined")} <= {
        (r["dataset"], r["kind"]) for r in rows}
    space = {n: tuple(p.shape) for n, p in eligible_weights(model).items()}
    for d in SETS:
        raw = regions.load(regions.region_path(tmp_path, d, "raw"))
        refined = regions.load(regions.region_path(tmp_path, d, "refined"))
        assert {n: tuple(m.shape) for n, m in raw.masks.items()} == space
        assert raw.meta["method"] == METHOD and raw.meta["dataset"] == d
        assert raw.meta["granularity"] == methods.get(METHOD).granularity
        assert 0 < raw.size and overlap.intersection_size(refined, raw) == refined.size


def test_method_is_registered_everywhere():
    assert METHOD in methods.REGISTRY and METHOD in config.METHODS
    assert METHOD in config.IdentifyCfg().methods and hasattr(config.IdentifyCfg(), METHOD)
