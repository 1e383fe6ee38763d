"""Every DVC stage depends on the code it runs: the modules its notebook imports, transitively, plus the stage
runner. A module missing from `deps` would let an edit leave `dvc status` clean and the results stale."""
import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SRC = ROOT / "src"
PACKAGE = "saferegions"


def _module_file(name: str) -> Path | None:
    """The file of a dotted module name inside the package (a package's __init__.py), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SRC.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Dotted names of package modules a parsed source imports anywhere (lazy imports in functions too, and
    "module:attribute" references resolved at run time)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}   # `from pkg import submodule`
    # a "module:attribute" string names code imported when first used (the method registry's runners)
    names |= {node.value.partition(":")[0] for node in ast.walk(tree) if isinstance(node, ast.Constant)
              and isinstance(node.value, str) and re.fullmatch(rf"{PACKAGE}(\.\w+)+:\w+", node.value)}
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):   # importing a.b.c runs a/__init__ and a/b/__init__ too
            if _module_file(".".join(parts[:i])):
                found.add(".".join(parts[:i]))
    return found


def _package_of(name: str) -> str:
    file = _module_file(name)
    return name if file.name == "__init__.py" else name.rpartition(".")[0]


def code_files(roots: set[str]) -> set[Path]:
    """The package files reachable from `roots` (dotted module names) through imports, and the package data
    files (`registry/*.json`) those modules read."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(_module_file(name).read_text())
        todo += sorted(_imported_modules(tree, _package_of(name)) - seen)
    files = {_module_file(n).relative_to(ROOT) for n in seen}
    data = {Path("src", PACKAGE, m) for f in files for m in re.findall(r"registry/[\w.-]+", (ROOT / f).read_text())}
    return files | data


def notebook_imports(notebook: Path) -> set[str]:
    cells = json.loads(notebook.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return _imported_modules(ast.parse(source), PACKAGE)


def _stages():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    from saferegions.stage import NOTEBOOKS
    return [(name, spec, ROOT / "notebooks" / f"{NOTEBOOKS[name]}.ipynb") for name, spec in pipeline.items()]


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("name,spec,notebook", _stages(), ids=lambda x: x if isinstance(x, str) else "")
def test_stage_deps_list_every_module_it_runs(name, spec, notebook):
    runner = spec["cmd"].split("-m ", 1)[1].split()[0]
    needed = code_files(notebook_imports(notebook) | {runner})
    deps = spec["deps"]
    missing = sorted(str(p) for p in needed if not _covered(p, deps))
    assert not missing, f"stage {name!r} runs these modules but dvc.yaml does not list them in deps: {missing}"
    assert str(notebook.relative_to(ROOT)) in deps
    listed = [Path(d) for d in deps if d.startswith("src/") and Path(d).suffix in (".py", ".json")]
    unused = sorted(str(d) for d in listed if d not in needed)
    assert not unused, f"stage {name!r} lists modules it never imports: {unused}"


def test_import_graph_follows_relative_and_lazy_imports(tmp_path):
    """The derivation itself: a module reached only through a lazy relative import inside a function counts."""
    tree = ast.parse("def f():\n    from .io import write_json\n    from .methods import esi\n")
    assert _imported_modules(tree, PACKAGE) >= {f"{PACKAGE}.io", f"{PACKAGE}.methods", f"{PACKAGE}.methods.esi"}
    files = code_files({f"{PACKAGE}.stage"})
    assert Path("src/saferegions/stage.py") in files and Path("src/saferegions/io.py") in files
    late = ast.parse(f'RUNNER = "{PACKAGE}.methods.snip:run"')
    assert f"{PACKAGE}.methods.snip" in _imported_modules(late, PACKAGE)
