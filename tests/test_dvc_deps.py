"""Every DVC stage depends on exactly the code it runs (`saferegions.deps` follows the imports): a module missing
from deps would let an edit leave results stale, an extra one re-runs stages for nothing (editing one method
used to re-run the whole pipeline)."""
import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from saferegions import deps

RUNNERS = {f"src/saferegions/methods/{m}.py" for m in ("snip", "wanda", "neuron", "layer", "nlsr", "esi", "context")}


def test_dvc_yaml_lists_the_code_each_stage_imports():
    diff = deps.check(deps.Graph(ROOT))
    assert not diff, f"run `python -m saferegions.deps --write`:\n{diff}"


def test_params_validation_never_reaches_a_method_runner():
    graph = deps.Graph(ROOT)
    assert not graph.files(graph.closure({"saferegions.config", "saferegions.stage"})) & RUNNERS
    code, notes = deps.computed(graph)
    assert not any(runner in note for note in notes for runner in RUNNERS), notes   # shared library code only
    for stage in ("data", "models", "baseline", "calibrate", "report"):
        assert not set(code[stage]) & RUNNERS, stage


def test_registry_references_count_only_where_a_stage_resolves_them():
    """The identify items share no method's file (each names its own through the template); validate removes
    regions of every granularity, so it runs the neuron and layer modules, and Wanda's scorer (the importance its
    matched control matches), and no other method's runner."""
    code, _ = deps.computed(deps.Graph(ROOT))
    identify = set(code["identify"])
    assert "src/saferegions/methods/${item.method}.py" in identify
    assert not identify & (RUNNERS - {"src/saferegions/methods/context.py"})
    validate = set(code["validate"]) & RUNNERS
    assert validate == {f"src/saferegions/methods/{m}.py" for m in ("neuron", "layer", "context", "wanda")}


def _package(root: Path, files: dict[str, str]) -> deps.Graph:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return deps.Graph(root)


def test_import_graph_follows_lazy_relative_imports_data_and_references_but_not_the_registrys(tmp_path):
    graph = _package(tmp_path, {
        "src/saferegions/__init__.py": "",
        "src/saferegions/plan.py": """
            from . import io, methods
            def main():
                from .sub import lazy     # imported inside a function: still code of the stage
            SCORER = "saferegions.scorer:run"   # imported when first used: code of the stage too
            """,
        "src/saferegions/io.py": "import json\nPATH = 'registry/table.json'\n",
        "src/saferegions/sub/__init__.py": "",
        "src/saferegions/sub/lazy.py": "from ..io import PATH\n",
        "src/saferegions/scorer.py": "",
        "src/saferegions/methods/__init__.py": "RUNNER = 'saferegions.methods.runner:run'   # only where resolved\n",
        "src/saferegions/methods/runner.py": "",
        "src/saferegions/registry/table.json": "{}",
    })
    assert graph.files(graph.closure({"saferegions.plan"})) == {
        f"src/saferegions/{f}" for f in ("__init__.py", "plan.py", "io.py", "sub/__init__.py", "sub/lazy.py",
                                         "scorer.py", "methods/__init__.py", "registry/table.json")}


def test_a_plain_module_stage_gets_its_deps_and_check_shows_a_diff(tmp_path, capsys):
    """A stage that runs a module (no notebook) is handled like the notebook stages; `--check` exits non-zero
    with a diff while dvc.yaml is stale, `--write` fixes only the code deps, and the result checks clean."""
    _package(tmp_path, {"src/saferegions/__init__.py": "", "src/saferegions/plan.py": "from . import io\n",
                        "src/saferegions/io.py": "", "src/saferegions/stage.py": "NOTEBOOKS = {}\n"})
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        stages:
          # the plan comes first
          plan:
            cmd: python -m saferegions.plan params.yaml --gpu-gb 80
            deps:
              - params.yaml
              - src/saferegions/gone.py
            outs:
              - results/plan.json: {cache: false}
        """))
    assert deps.main(["--root", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "-      - src/saferegions/gone.py" in err and "+    deps: [params.yaml, src/saferegions/__init__.py" in err
    assert deps.main(["--root", str(tmp_path), "--write"]) == 0
    text = (tmp_path / "dvc.yaml").read_text()
    assert "  # the plan comes first\n" in text and "results/plan.json: {cache: false}" in text
    assert yaml.safe_load(text)["stages"]["plan"]["deps"] == [
        "params.yaml", "src/saferegions/__init__.py", "src/saferegions/io.py", "src/saferegions/plan.py"]
    assert deps.main(["--root", str(tmp_path), "--check"]) == 0


# ---------------------------------------------------------------- what DVC itself says after an edit


def _dvc_status(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def locked_copy(tmp_path_factory):
    """The repository's files (tracked, or new and not ignored) in a fresh folder, with a dvc.lock that matches:
    `dvc status` is clean. Placeholders stand in for the data, models, artifacts and results the stages read
    and write (results/ is left out of the copy: hashing its files would only slow the test)."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in listed:
        if name and not name.startswith("results/") and (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    with contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:
        stages = repo.index.stages
        paths = {Path(x.fs_path) for s in stages for x in [*s.deps, *s.outs] if hasattr(x, "fs_path")}
        for path in sorted(paths, key=lambda p: -len(p.parts)):   # a folder's contents before the folder
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder\n")
        for dvcfile, group in itertools.groupby(stages, key=lambda s: s.dvcfile):   # = `dvc commit --force`
            group = list(group)                                                      # without the run cache
            for stage in group:
                stage.save(run_cache=False)
                stage.commit()
            dvcfile.dump_stages(group, update_pipeline=False)
    assert _dvc_status(root) == {}
    return root


def _changed_after_editing(root: Path, module: str) -> set[str]:
    path = root / module
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        return set(_dvc_status(root))
    finally:
        path.write_text(original)


@pytest.mark.parametrize("method,also", [("wanda", {"validate"}), ("neuron", {"validate"})])
def test_editing_one_method_marks_only_the_stages_that_run_it(locked_copy, method, also):
    """Only the identify items of that method and the stages whose imports reach its file; never the data,
    models, baseline or calibrate stages, nor another method's identify item."""
    module = f"src/saferegions/methods/{method}.py"
    importers = {name for name, files in deps.computed(deps.Graph(locked_copy))[0].items() if module in files}
    models = yaml.safe_load((locked_copy / "params.yaml").read_text())["identify"]["models"]
    changed = _changed_after_editing(locked_copy, module)
    assert changed == {f"identify@{method}-{m}" for m in models} | importers
    assert also <= importers and not {"data", "models", "baseline", "identify"} & importers
    assert not any(s.startswith("calibrate") for s in changed)
