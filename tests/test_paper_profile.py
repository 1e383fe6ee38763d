"""profiles/paper.yaml parses with the config of every section that exists, names hub models only, and lists
every identified model as a role."""
import yaml

from conftest import ROOT
from saferegions import config

PENDING = {"overlap", "esi", "set", "spa"}   # sections whose dataclasses other branches add (`{}` = defaults)


def test_paper_profile_parses_and_names_hub_models():
    raw = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
    unknown = set(raw) - set(config.SECTIONS)
    assert unknown <= PENDING, unknown
    assert all(raw[s] == {} for s in unknown)
    cfg = config.parse({k: v for k, v in raw.items() if k in config.SECTIONS})
    assert cfg.run.device == "cuda"
    assert all(m.offline is None and "/" in m.id for m in cfg.models.values())   # hub ids only
    assert {"aligned", "unaligned", "encoder"} <= set(cfg.models)
    assert set(cfg.identify.models) <= set(cfg.models) and len(cfg.identify.models) >= 9
    assert cfg.judges.llama_guard.id == "meta-llama/Llama-Guard-3-8B"
    assert cfg.calibrate.n == 128 and len(cfg.calibrate.datasets) == 10 and cfg.identify.methods == list(config.METHODS)
    # identification at paper scale: no method-level CPU reductions left
    assert not [r for r in config.deviations(cfg.identify, "identify") if r["param"] != "identify.models"]


def test_paper_smoke_is_the_generated_copy_and_changes_only_counts_and_sizes():
    """profiles/paper-smoke.yaml is what `python -m saferegions.profiles smoke` writes, and against paper.yaml it
    changes counts and sizes only, plus where it runs (CPU, bf16)."""
    from saferegions import profiles

    paper = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
    committed = (ROOT / "profiles" / "paper-smoke.yaml").read_text()
    assert committed == profiles.render(profiles.smoke(paper)), "re-run `python -m saferegions.profiles smoke`"
    diffs = profiles.differences(paper, yaml.safe_load(committed))
    assert [d for d in diffs if not d["count_or_size"]] == [
        {"key": "run.device", "paper": "cuda", "derived": "cpu", "count_or_size": False},
        {"key": "run.dtype", "paper": "auto", "derived": "bfloat16", "count_or_size": False}]
    keys = {d["key"] for d in diffs}
    assert {"baseline.n_prompts", "set.max_steps", "data.ident_size", "spa.task_max_new_tokens"} <= keys
    assert not any(k.startswith(("models.", "judges.llama_guard", "esi.judges")) for k in keys)   # same hub path


def test_a_changed_method_param_is_refused_by_the_smoke_generator():
    """Anything but a smaller count or size (a learning rate, a region fraction, a judge, a count grown, another
    revision) is refused."""
    import pytest

    from saferegions import profiles

    paper = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
    for change in ({"set": {"lr": 1e-3}}, {"identify": {"q": 0.5}}, {"esi": {"judges": ["learned"]}},
                   {"baseline": {"n_prompts": 2000}}, {"models": {"aligned": {"revision": "main"}}}):
        with pytest.raises(ValueError, match="only counts and sizes"):
            profiles.smoke(paper, profiles._merge(profiles.SMOKE, change))
