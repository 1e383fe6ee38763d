import pytest
import yaml

from saferegions import config
from conftest import ROOT


def test_default_and_smoke_params_validate():
    for path in (ROOT / "params.yaml", ROOT / "profiles" / "smoke.yaml"):
        cfg = config.load(path)
        assert set(cfg.baseline.models) <= set(cfg.models)


@pytest.mark.parametrize("raw, fragment", [
    ({"baseline": {"datasets": ["advbnch"]}}, "valid choices: advbench"),
    ({"models": {"a": {"id": "x"}}, "baseline": {"models": ["b"]}}, "valid choices: a"),
    ({"models": {"a": {"id": "x", "offline": "no-such-mirror"}}}, "qwen2.5-coder-0.5b-instruct"),
    ({"baseline": {"n_prompts": "many"}}, "expected int"),
    ({"baseline": {"n_prompts": 0}}, "must be > 0"),
    ({"baseline": {"n_promts": 3}}, "unknown key(s) ['n_promts']"),
    ({"run": {"dtype": "int8"}}, "valid choices: auto, bfloat16"),
    ({"judges": {"learned": {"heldout_frac": 1.5}}}, "(0, 1]"),
    ({"nosuchsection": {}}, "unknown params section"),
])
def test_bad_values_give_one_clear_error(raw, fragment):
    with pytest.raises(config.ConfigError) as e:
        config.parse(raw)
    assert fragment in str(e.value)


def test_stage_runner_rejects_bad_params_before_loading_anything(tmp_path):
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["baseline"]["models"] = ["aligned", "nonexistent"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    from saferegions import stage
    with pytest.raises(SystemExit) as e:
        stage.run("baseline", "params.yaml", root=tmp_path)
    assert "nonexistent" in str(e.value) and "aligned" in str(e.value)


def test_dvc_params_match_stage_sections():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, sections in config.STAGE_SECTIONS.items():
        assert sorted(stages[name]["params"]) == sorted(sections), name


@pytest.mark.parametrize("n", [2, 15])
def test_safelayer_needs_enough_distinct_prompts_per_side(n):
    """SafeLayer's random pairs with 2 prompts per side are one pair repeated: one clear error below the minimum."""
    with pytest.raises(config.ConfigError) as e:
        config.parse({"identify": {"layer": {"n": n}}})
    assert "identify.layer.n" in str(e.value) and f"at least {config.LAYER_MIN_PROMPTS}" in str(e.value)
    assert config.parse({"identify": {"layer": {"n": config.LAYER_MIN_PROMPTS}}}).identify.layer.n == 16
    for path in (ROOT / "params.yaml", ROOT / "profiles" / "smoke.yaml"):
        assert config.load(path).identify.layer.n >= config.LAYER_MIN_PROMPTS


def test_validating_params_imports_no_method_runner_and_no_torch():
    """Method params are plain dataclasses: the stage runner validates params.yaml without importing torch or any
    method's code, so an edit to a method is no edit to the stages that only validate params."""
    import os
    import subprocess
    import sys
    probe = ("import sys; from saferegions import stage; stage.config.load('params.yaml'); "
             "print(sorted(m for m in sys.modules if m.startswith(('saferegions.methods.', 'torch'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['saferegions.methods.params']"
