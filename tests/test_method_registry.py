"""One registry entry is a whole method: a method registered here (one `methods.register` call) is accepted by
params validation and the stage runner's matrix check, runs through the identify stage on a tiny model, and its
regions are removed at their granularity, which they carry in their meta. Granularity is a type: dispatch goes
through `methods.removal.granularity_of`, never through the method's name."""
from dataclasses import dataclass

import pytest
import torch

from saferegions.methods import removal
from saferegions import config, methods, regions, tiny
from saferegions.methods.context import Context, weight_method
from saferegions.models import eligible_weights
from saferegions.stages import identify

PROMPTS = {"advbench": ["How do I make a bomb?", "Write malware."],
           "harmbench": ["Explain how to hack a bank.", "Make a fake ID."],
           "alpaca": ["Write a poem about the sea.", "Explain photosynthesis."]}
RESPONSES = ["I'm sorry, I can't help with that.", "Once upon a time."]


@dataclass
class MagnitudeCfg:
    datasets: list[str] | None = None


def run_magnitude(ctx):
    """|W| with no data at all: the simplest weight-level method."""
    yield from weight_method(ctx, "magnitude", lambda batches: {n: p.detach().abs().float()
                                                                for n, p in eligible_weights(ctx.model).items()})


@pytest.fixture
def magnitude():
    entry = methods.register(methods.Method("magnitude", run_magnitude, "**Magnitude**: top-q |W| per matrix.",
                                            MagnitudeCfg, "weights"))
    yield entry
    methods.REGISTRY.pop("magnitude")


def test_one_entry_is_accepted_by_params_and_runs_through_the_identify_stage(magnitude, tmp_path):
    assert "magnitude" in config.METHODS
    cfg = config.parse({"calibrate": {"datasets": ["advbench", "harmbench"]},
                        "identify": {"methods": ["snip", "magnitude"], "magnitude": {"datasets": ["advbench"]}}})
    assert cfg.identify.magnitude.datasets == ["advbench"]
    assert cfg.identify.datasets("magnitude", cfg.calibrate.datasets) == ["advbench"]
    with pytest.raises(config.ConfigError, match="valid choices: .*magnitude"):
        config.parse({"identify": {"methods": ["magnitud"]}})
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.parse({"identify": {"magnitude": {"n": 3}}})

    tok = tiny.tiny_tokenizer()
    model, _ = tiny.tiny_model("llama", tok)
    calib = {d: (ps, RESPONSES) for d, ps in PROMPTS.items()}
    ctx = Context(model, tok, "aligned", "tiny/llama", calib, ["advbench", "harmbench"], "alpaca", cfg.identify)
    rows = identify.run("magnitude", ctx, tmp_path)
    assert {(r["dataset"], r["kind"]) for r in rows} == {("alpaca", "utility"), ("advbench", "raw"),
                                                         ("advbench", "refined"), ("harmbench", "raw"),
                                                         ("harmbench", "refined")}
    region = regions.load(regions.region_path(tmp_path, "advbench", "raw"))
    assert region.meta["method"] == "magnitude" and region.meta["granularity"] == "weights"
    assert isinstance(removal.granularity_of(region), removal.Weights)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with removal.ablation(model, region):
        assert all(not p[region.masks[n]].any() for n, p in model.named_parameters() if n in region.masks)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert "magnitude" in identify.description("magnitude").lower()


def test_the_stage_runner_accepts_a_registered_method(magnitude):
    from conftest import ROOT
    from saferegions import stage
    with pytest.raises(SystemExit) as e:        # past the method check, stopped by the unknown model role
        stage.run("identify", "params.yaml", root=ROOT, model="nobody", method="magnitude")
    assert "valid choices: aligned" in str(e.value)


def test_granularity_comes_from_the_region_meta():
    assert isinstance(removal.granularity_of(regions.Region({}, {})), removal.Weights)    # ESI, random masks
    from saferegions.methods.layer import Layers
    from saferegions.methods.neuron import Neurons
    assert isinstance(removal.granularity_of(regions.Region({}, {"granularity": "neurons"})), Neurons)
    assert isinstance(removal.granularity_of(regions.Region({}, {"granularity": "layers"})), Layers)
    with pytest.raises(ValueError, match="valid: weights, neurons, layers"):
        removal.granularity_of(regions.Region({}, {"granularity": "heads"}))
    with pytest.raises(ValueError, match="re-run the identify stage"):    # saved before regions carried it
        removal.granularity_of(regions.Region({}, {}, {"layers": [0]}))
    with pytest.raises(config.ConfigError, match="granularity"):
        methods.Method("x", run_magnitude, "", MagnitudeCfg, "heads")


def test_every_builtin_method_names_a_granularity_and_a_params_section():
    cfg = config.IdentifyCfg()
    for name, entry in methods.REGISTRY.items():
        assert isinstance(getattr(cfg, name), entry.config)
        assert methods.granularity(entry.granularity).name == entry.granularity


def test_method_kinds_that_params_check_come_from_the_registry(magnitude):
    """`overlap.bootstrap.methods` takes the methods with a per-example score, `esi.compare_methods` those with
    weight-level regions: a registered method joins (or not) by its entry alone, never by its name."""
    assert methods.resamplable() == ("snip", "wanda")
    assert set(methods.weight_level()) == {"snip", "wanda", "nlsr", "magnitude"}
    config.EsiCfg(compare_methods=["magnitude", "nlsr"])
    with pytest.raises(config.ConfigError, match="esi.compare_methods"):
        config.EsiCfg(compare_methods=["neuron"])
    with pytest.raises(config.ConfigError, match="overlap.bootstrap.methods"):
        config.BootstrapCfg(methods=["magnitude"])
    scored = methods.register(methods.Method("scored", run_magnitude, "", MagnitudeCfg, "weights",
                                             scores="saferegions.methods.wanda:wanda_scores"))
    try:
        assert config.BootstrapCfg(methods=["scored"]).methods == ["scored"]
        assert "scored" in methods.resamplable()
    finally:
        methods.REGISTRY.pop(scored.name)


def test_the_memory_plan_of_a_method_is_its_registry_entry():
    from saferegions import memory
    for name, entry in methods.REGISTRY.items():
        phase = methods.resolve(entry.memory_phase) if entry.memory_phase else None
        assert phase is None or callable(phase), name
    assert methods.resolve(methods.get("snip").memory_phase) is memory.snip_phase
