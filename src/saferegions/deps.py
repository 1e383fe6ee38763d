"""Each DVC stage's code deps, found by following imports, so that editing a module re-runs exactly the stages
that run it.

A stage's code is the module its command runs (`python -m saferegions.X ...`), for `saferegions.stage NAME` also
the notebook it executes (`stage.NOTEBOOKS`), and every package module those import, transitively: top-level
and lazy (in-function) imports alike, plus the `registry/*.json` files a module reads. A "saferegions.x:attr"
string names code imported when first used: it counts as an import, except in the method registry
(`methods/__init__.py`), whose runners and granularities are code of a stage only where the stage resolves
them, as its module declares with `RESOLVES = methods.Resolves.X`: `ITEM_METHOD` (the identify stage: the
runner, diagnostics and granularity of its matrix item's method), `GRANULARITIES` (the validate stage: every
granularity, as it removes the regions of every method) or `SCORES` (the overlap stage: every method's
per-example score function, as its bootstrap re-identifies on resampled examples).

DVC cannot interpolate a list into `deps`, so a matrix stage over methods lists the code all its items share
and one templated path, `src/saferegions/methods/${item.method}.py`, for what only one method runs.

    python -m saferegions.deps           # print every stage's code deps
    python -m saferegions.deps --check   # exit 1 with a diff where dvc.yaml differs
    python -m saferegions.deps --write   # rewrite the code entries of dvc.yaml's deps (nothing else changes)
"""
from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import shlex
import sys
from pathlib import Path

import yaml

PACKAGE = "saferegions"
REGISTRY = f"{PACKAGE}.methods"   # its "module:attribute" strings count where a stage declares RESOLVES
ITEM = "${item.method}"
_DATA = re.compile(r"registry/[\w.-]+\.json|registry/[\w-]+(?=/)")   # a file, or a folder of files
_REF = re.compile(rf"({PACKAGE}(?:\.\w+)+):\w+")


class DepsError(ValueError):
    pass


def _is_code(dep: str) -> bool:
    """A deps entry this module owns: package source and data, or a stage's notebook."""
    return dep.startswith(f"src/{PACKAGE}/") or (dep.startswith("notebooks/") and dep.endswith(".ipynb"))


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Dotted names a parsed source imports anywhere (lazy imports inside functions too), relative imports made
    absolute against `package`; `from a import b` also names `a.b`, which may be a submodule."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


def notebook_modules(notebook: Path) -> set[str]:
    cells = json.loads(notebook.read_text())["cells"]
    return imported_modules(ast.parse("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")),
                            PACKAGE)


def _resolves(tree: ast.AST) -> set[str]:
    """The `Resolves` members a module declares at top level (`RESOLVES = methods.Resolves.X`, or a tuple)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "RESOLVES" for t in node.targets):
            return {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute)
                    and isinstance(n.value, (ast.Name, ast.Attribute)) and ast.unparse(n.value).endswith("Resolves")}
    return set()


class Graph:
    """The package's import graph under `root` (a checkout: src/saferegions, notebooks/, dvc.yaml)."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)
        self._trees: dict[str, ast.Module] = {}
        self._imports: dict[str, set[str]] = {}

    def file(self, module: str) -> Path | None:
        """The source file of a dotted module name inside the package (a package's __init__.py), or None."""
        parts = module.split(".")
        if parts[0] != PACKAGE:
            return None
        base = self.root.joinpath("src", *parts)
        return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.exists()), None)

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            self._trees[module] = ast.parse(self.file(module).read_text())
        return self._trees[module]

    def package_modules(self, names: set[str]) -> set[str]:
        """The package modules that importing `names` runs: a.b.c runs a, a.b and a.b.c."""
        found = set()
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if self.file(".".join(parts[:i]))}
        return found

    def imports(self, module: str) -> set[str]:
        """The package modules `module` imports, anywhere in it."""
        if module not in self._imports:
            tree = self.tree(module)
            package = module if self.file(module).name == "__init__.py" else module.rpartition(".")[0]
            names = imported_modules(tree, package)
            if module != REGISTRY:   # another "module:attribute" reference: code imported when first used
                names |= {m.group(1) for n in ast.walk(tree) if isinstance(n, ast.Constant)
                          and isinstance(n.value, str) for m in [_REF.fullmatch(n.value)] if m}
            self._imports[module] = self.package_modules(names)
        return self._imports[module]

    def closure(self, roots: set[str]) -> set[str]:
        seen, todo = set(), sorted(self.package_modules(roots))
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += sorted(self.imports(name) - seen)
        return seen

    def notebooks(self) -> dict[str, str]:
        """`stage.NOTEBOOKS` of this checkout (stage name -> notebook name), read without importing it."""
        for node in self.tree(f"{PACKAGE}.stage").body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NOTEBOOKS" for t in node.targets):
                return ast.literal_eval(node.value)
        raise DepsError(f"{PACKAGE}/stage.py defines no NOTEBOOKS")

    def files(self, modules: set[str]) -> set[str]:
        """Repository paths of the modules and of the package data files (`registry/*.json`, or a `registry/<folder>/` of them) they read."""
        paths = {self.file(m) for m in modules}
        data = {self.root / "src" / PACKAGE / d for p in paths for d in _DATA.findall(p.read_text())}
        return {str(p.relative_to(self.root)) for p in paths | data if p.exists()}

    def resolves(self, modules: set[str]) -> set[str]:
        return set().union(*(_resolves(self.tree(m)) for m in modules))


def _ref_module(ref) -> str:
    """The module a registry reference ("module:attribute", or a callable or class) lives in."""
    return ref.partition(":")[0] if isinstance(ref, str) else ref.__module__


def method_modules(name: str) -> set[str]:
    """The modules that running method `name` resolves: its runner, diagnostics and granularity."""
    from . import methods
    entry = methods.REGISTRY[name]
    refs = [entry.runner, entry.diagnostics, methods.GRANULARITIES[entry.granularity]]
    return {_ref_module(r) for r in refs if r is not None}


def granularity_modules() -> set[str]:
    from . import methods
    return {_ref_module(r) for r in methods.GRANULARITIES.values()}


def score_modules() -> set[str]:
    from . import methods
    return {_ref_module(m.scores) for m in methods.REGISTRY.values() if m.scores is not None}


def command_roots(graph: Graph, cmd: str | list[str]) -> tuple[set[str], list[str]]:
    """(Modules, notebook paths) a stage command (or list of commands) runs: `python -m MODULE ARGS`, and for the
    notebook runner (`saferegions.stage NAME`) the notebook of NAME."""
    modules, notebooks = set(), []
    for one in [cmd] if isinstance(cmd, str) else cmd:
        argv = shlex.split(one)
        if "-m" not in argv or not graph.file(argv[argv.index("-m") + 1]):
            raise DepsError(f"command {one!r}: expected `python -m {PACKAGE}.<module> ...`")
        module, args = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2:]
        modules.add(module)
        if module == f"{PACKAGE}.stage":
            notebooks.append(f"notebooks/{graph.notebooks()[args[0]]}.ipynb")
            modules |= notebook_modules(graph.root / notebooks[-1])
    return modules, notebooks


def stage_deps(graph: Graph, name: str, spec: dict) -> tuple[list[str], list[str]]:
    """(Code deps of stage `name` for dvc.yaml, notes on where they over-approximate). A matrix item's own
    method is the templated path; the rest is shared by every item."""
    from . import methods
    modules, notebooks = command_roots(graph, spec["cmd"])
    modules = graph.closure(modules)
    declared = graph.resolves(modules)
    unknown = declared - {r.name for r in methods.Resolves}
    if unknown:
        raise DepsError(f"stage {name!r}: unknown RESOLVES {sorted(unknown)}; valid: "
                        f"{', '.join(r.name for r in methods.Resolves)}")
    if methods.Resolves.GRANULARITIES.name in declared:
        modules |= graph.closure(granularity_modules())
    if methods.Resolves.SCORES.name in declared:
        modules |= graph.closure(score_modules())
    shared, templated, notes = graph.files(modules), [], []
    if methods.Resolves.ITEM_METHOD.name in declared:
        if "method" not in (spec.get("matrix") or {}):
            raise DepsError(f"stage {name!r} runs its matrix item's method but has no `method` matrix axis")
        own = {m: graph.files(graph.closure(method_modules(m))) - shared for m in methods.REGISTRY}
        template = f"src/{PACKAGE}/methods/{ITEM}.py"
        for m, files in own.items():
            mine = template.replace(ITEM, m)
            if mine not in files:   # the matrix item names that file: it must exist and be the item's own
                raise DepsError(f"stage {name!r}: method {m!r} must run from {mine}, a file only its items import")
            extra = sorted(files - {mine})
            if extra:
                notes.append(f"stage {name!r}: {extra} run only by method {m!r} are listed for every item "
                             "(one templated path per item)")
            shared |= files - {mine}
        templated = [template]
    return sorted(notebooks) + sorted(shared - set(notebooks)) + templated, notes


def pipeline(graph: Graph) -> dict:
    return yaml.safe_load((graph.root / "dvc.yaml").read_text())["stages"]


def computed(graph: Graph) -> tuple[dict[str, list[str]], list[str]]:
    """{stage: code deps} for every stage of dvc.yaml, and the notes of `stage_deps`."""
    out, notes = {}, []
    for name, spec in pipeline(graph).items():
        out[name], n = stage_deps(graph, name, spec)
        notes += n
    return out, notes


def _flow(key: str, items: list[str], indent: int = 4, width: int = 110) -> list[str]:
    """`key: [a, b, ...]` wrapped at `width`; an entry holding a YAML flow indicator (DVC's `${...}`) quoted."""
    head = " " * indent + f"{key}: ["
    lines, line = [], head
    for i, item in enumerate(items):
        piece = (json.dumps(item) if re.search(r"[{}\[\],#]", item) else item) + (", " if i < len(items) - 1 else "]")
        if line != head and len(line + piece.rstrip()) > width:
            lines.append(line.rstrip() + "\n")
            line = " " * len(head)
        line += piece
    return lines + [line + "\n"]


def rewrite(text: str, code: dict[str, list[str]]) -> str:
    """dvc.yaml with each stage's `deps` = its other deps (as they are) + `code[stage]`, one flow list; every
    other line (comments, cmd, params, outs) stays as it is. A comment on deps goes above the `deps:` line."""
    stages = yaml.safe_load(text)["stages"]
    missing = [s for s in code if "deps" not in stages[s]]
    if missing:
        raise DepsError(f"stage(s) {missing} have no `deps:` key; add `deps: []` and rewrite")
    lines, out, stage, i = text.splitlines(keepends=True), [], None, 0
    while i < len(lines):
        line = lines[i]
        head = re.match(r"^  (\S[^:]*):\s*(#.*)?$", line)
        if head:
            stage = head.group(1)
        i += 1
        if stage not in code or not re.match(r"^    deps:", line):
            out.append(line)
            continue
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > 4):
            i += 1    # the old deps block: list items or flow continuation lines
        out += _flow("deps", [d for d in stages[stage]["deps"] if not _is_code(d)] + code[stage])
    return "".join(out)


def check(graph: Graph) -> str:
    """The diff between dvc.yaml and its computed code deps ("" when they match)."""
    text = (graph.root / "dvc.yaml").read_text()
    new = rewrite(text, computed(graph)[0])
    return "".join(difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                        "dvc.yaml", "dvc.yaml (computed by python -m saferegions.deps)"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.deps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".", help="the checkout holding dvc.yaml")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff where dvc.yaml differs")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = ap.parse_args(argv)
    graph = Graph(args.root)
    try:
        code, notes = computed(graph)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if args.check:
            diff = check(graph)
            if diff:
                print(f"{diff}\ndvc.yaml's code deps are stale: run python -m {PACKAGE}.deps --write", file=sys.stderr)
            return 1 if diff else 0
        if args.write:
            path = graph.root / "dvc.yaml"
            path.write_text(rewrite(path.read_text(), code))
            return 0
    except DepsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, deps in code.items():
        print(f"{name}:\n" + "".join(f"  {d}\n" for d in deps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
