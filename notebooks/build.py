"""Build the notebooks from their `# %%` sources in notebooks/src, so that diffs and reviews read as Python.

`# %% [md]` starts a markdown cell (lines keep their leading '# ' off), `# %% [params]` the papermill
parameters cell, `# %%` a code cell. Usage: python notebooks/build.py [NAME ...] (default: every source)."""
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
          "language_info": {"name": "python"}}


def _cell(kind: str, lines: list[str]):
    text = "\n".join(lines).strip("\n")
    if kind == "md":
        return new_markdown_cell("\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines()))
    cell = new_code_cell(text)
    if kind == "params":
        cell.metadata["tags"] = ["parameters"]
    return cell


def build(source: Path) -> nbformat.NotebookNode:
    cells, kind, lines = [], None, []
    for line in source.read_text().splitlines():
        if line.startswith("# %%"):
            if kind:
                cells.append(_cell(kind, lines))
            kind = "md" if "[md]" in line else "params" if "[params]" in line else "code"
            lines = []
        else:
            lines.append(line)
    if kind:
        cells.append(_cell(kind, lines))
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"   # stable ids: rebuilding an unchanged source leaves the notebook (a DVC dep) as is
    return new_notebook(cells=cells, metadata=KERNEL)


if __name__ == "__main__":
    names = sys.argv[1:] or [p.stem for p in sorted((HERE / "src").glob("*.py"))]
    for name in names:
        nbformat.write(build(HERE / "src" / f"{name}.py"), HERE / f"{name}.ipynb")
        print(f"notebooks/{name}.ipynb")
