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
