"""The layout shows the pipeline: one module per DVC stage, the only package code its notebook imports, and a
library below that never imports a stage; a method's kind is decided in its own file, not by name elsewhere."""
import re

import pytest
import yaml

from conftest import ROOT
from saferegions.deps import PACKAGE, Graph, notebook_modules

SRC = ROOT / "src" / PACKAGE
GRAPH = Graph(ROOT)
# the stages that execute a notebook (`python -m saferegions.stage NAME`); others run a module of their own
STAGES = [name for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
          if spec["cmd"].split()[2:3] == [f"{PACKAGE}.stage"]]


def _module_name(path):
    rel = path.relative_to(ROOT / "src").with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_its_module_and_its_notebook_calls_only_that(stage):
    from saferegions.stage import NOTEBOOKS

    assert (SRC / "stages" / f"{stage}.py").exists()
    assert NOTEBOOKS[stage].split("_", 1)[1] == stage
    imported = GRAPH.package_modules(notebook_modules(ROOT / "notebooks" / f"{NOTEBOOKS[stage]}.ipynb"))
    assert imported - {PACKAGE, f"{PACKAGE}.stages"} == {f"{PACKAGE}.stages.{stage}"}


def test_notebooks_are_numbered_uniquely_in_pipeline_order():
    from saferegions.stage import NOTEBOOKS

    assert [NOTEBOOKS[s] for s in STAGES] == sorted(NOTEBOOKS[s] for s in STAGES)
    assert len({n.split("_")[0] for n in NOTEBOOKS.values()}) == len(NOTEBOOKS)


def test_the_library_never_imports_a_stage():
    offenders = []
    for path in SRC.rglob("*.py"):
        if "stages" in path.relative_to(SRC).parts:
            continue
        imported = GRAPH.imports(_module_name(path))
        if any(m == f"{PACKAGE}.stages" or m.startswith(f"{PACKAGE}.stages.") for m in imported):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_no_method_name_switch_outside_the_methods_package():
    pattern = re.compile(r"method ==|method in WEIGHT_METHODS|method != ")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SRC.rglob("*.py") if "methods" not in p.relative_to(SRC).parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits
