"""The hub code path, offline: tiny random checkpoints under the paper profile's hub ids in a Hugging Face cache
(hub_cache.py), loaded by id and pinned revision; and `dvc repro` of profiles/paper-smoke.yaml over that cache."""
import json
import re
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
import yaml

import hub_cache
from conftest import ROOT, repro_in_copy
from saferegions import config, models


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache that this process reads offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _hub_revisions(params: Path) -> dict[str, str | None]:
    """{hub id: pinned revision} of every model and judge a params file names."""
    cfg = config.load(params)
    entries = list(cfg.models.values()) + [cfg.judges.llama_guard]
    return {m.id: m.revision for m in entries}


def test_every_paper_hub_id_is_pinned_and_has_a_tiny_stand_in():
    revisions = _hub_revisions(ROOT / "profiles" / "paper.yaml")
    assert set(revisions) <= set(hub_cache.HUB_FAMILIES)
    assert all(r == "main" or re.fullmatch(r"[0-9a-f]{40}", r) for r in revisions.values()), revisions


def test_pinned_revision_is_the_one_loaded(offline_cache):
    """Two snapshots of one repo: the pinned commit loads its own weights, `main` the other, and the commit
    each resolves to is the snapshot that was read."""
    repo = "meta-llama/Llama-3.2-1B-Instruct"
    main = hub_cache.add_snapshot(offline_cache, repo, "llama", "main", seed=0)
    pinned = hub_cache.add_snapshot(offline_cache, repo, "llama", "1" * 40, seed=1, set_main=False)
    reference = {tag: hub_cache.tiny_checkpoint("llama", seed)[0].state_dict() for tag, seed in (("main", 0),
                                                                                                  ("v1", 1))}
    for revision, commit, tag in ((pinned, pinned, "v1"), ("main", main, "main"), (None, main, "main")):
        entry = models.ModelEntry(repo, None, revision)
        model, tok = models.load(entry, dtype="bfloat16", device="cpu")
        assert all(torch.equal(p, reference[tag][n]) for n, p in model.state_dict().items())
        assert models.resolved_revision(entry) == commit
        assert models.load_config(entry).model_type == "llama" and tok.chat_template
    assert not torch.equal(reference["main"]["lm_head.weight"], reference["v1"]["lm_head.weight"])
    assert models.resolved_revision(models.ModelEntry(repo, None, "0" * 40)) is None   # not in the cache


def test_models_stage_describes_hub_models_from_their_config(offline_cache, monkeypatch):
    """Stage 2 on the paper profile's hub ids: the encoder is recognised from its config, every decoder family
    has an adapter, the counts equal the loaded models' and the resolved commit is recorded; no weights read."""
    from saferegions.stages import models as stage

    cfg = config.load(ROOT / "profiles" / "paper.yaml")
    commits = hub_cache.build(offline_cache, {m.id: m.revision for m in cfg.models.values()})
    rows = stage.materialize(cfg)
    monkeypatch.setattr(models.T.AutoModelForCausalLM, "from_pretrained", None)   # describing loads no weights
    stage.describe(cfg, rows)
    by = {r["role"]: r for r in rows}
    assert by["encoder"]["family"] == "bert" and by["moe"]["family"] == "olmoe"
    for role, row in by.items():
        entry = cfg.models[role]
        assert row["source"] == "hub" and row["revision"] == entry.revision
        assert row["resolved_revision"] == commits[entry.id]
        family = hub_cache.HUB_FAMILIES[entry.id]
        model, _ = hub_cache.tiny_checkpoint(family)
        assert row["family"] == family and row["params_millions"] == round(models.param_count(model) / 1e6, 1)
        assert row["layers"] == model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral", "olmoe", "mixtral", "qwen3", "qwen3_moe"])
def test_every_family_loads_by_hub_id(offline_cache, family):
    repo = next(r for r, f in hub_cache.HUB_FAMILIES.items() if f == family)
    hub_cache.build(offline_cache, {repo: "main"})
    model, tok = models.load(models.ModelEntry(repo, None, "main"), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.config.model_type == family
    assert models.eligible_weights(model) and tok.chat_template


def test_paper_smoke_profile_has_the_evaluation_judge():
    """Llama Guard judges the evaluations of the paper profile (and so of its smoke copy)."""
    raw = yaml.safe_load((ROOT / "profiles" / "paper-smoke.yaml").read_text())
    assert raw["evaluation"]["judge"] == "llama_guard"


@pytest.mark.slow
def test_paper_smoke_pipeline_runs_through_the_hub_path(tmp_path, mirror):
    """`dvc repro` of profiles/paper-smoke.yaml, every model loaded by hub id from an offline HF cache."""
    cache = tmp_path / "hf"
    commits = hub_cache.build(cache / "hub", _hub_revisions(ROOT / "profiles" / "paper-smoke.yaml"))
    work, _ = repro_in_copy(tmp_path / "repo", "paper-smoke.yaml", mirror,
                            {"HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub"), "HF_HUB_OFFLINE": "1",
                             "TRANSFORMERS_OFFLINE": "1"})

    cfg = config.load(work / "params.yaml")
    assert cfg.run.device == "cpu" and cfg.run.dtype == "bfloat16"
    described = json.loads((work / "results/models/metrics.json").read_text())["models"]
    assert set(described) == set(cfg.models) and all(r["source"] == "hub" for r in described.values())
    assert all(r["resolved_revision"] == commits[r["id"]] for r in described.values())
    assert {r["family"] for r in described.values()} >= {"llama", "qwen2", "gemma2", "mistral", "olmoe", "bert"}
    stages = ["models", "baseline", "validate", "overlap", "esi", "set", "spa", "report"]
    stages += [f"identify/{m}-{method}" for m in cfg.identify.models for method in cfg.identify.methods]
    for stage in stages:
        nb = json.loads((work / "results" / stage / "notebook.ipynb").read_text())
        assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"], stage
    base = json.loads((work / "results/baseline/metrics.json").read_text())
    assert set(base["models"]) == set(cfg.baseline.models)   # every family generated, loaded by hub id in bf16
    esi = json.loads((work / "results/esi/metrics.json").read_text())
    assert set(esi) == set(cfg.esi.models)
    assert all(m["judge"] == "guard" and m["model_id"] == cfg.models[role].id for role, m in esi.items())
    assert set(json.loads((work / "results/set/metrics.json").read_text())) >= set(cfg.set.arms)
    assert set(json.loads((work / "results/spa/metrics.json").read_text())) >= set(cfg.spa.tasks)
    prov = json.loads((work / "results/report/provenance.json").read_text())["models"]
    assert prov["judges.llama_guard"]["revision"] == commits[cfg.judges.llama_guard.id]
    assert all(prov[role]["revision"] == commits[m.id] for role, m in cfg.models.items())
