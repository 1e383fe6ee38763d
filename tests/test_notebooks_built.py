"""The committed notebooks are exactly what notebooks/build.py makes of their `# %%` sources."""
import importlib.util
from pathlib import Path

import nbformat
import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks"
spec = importlib.util.spec_from_file_location("build", NB / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


@pytest.mark.parametrize("source", sorted((NB / "src").glob("*.py")), ids=lambda p: p.stem)
def test_notebook_matches_its_source(source):
    built = nbformat.writes(build.build(source))
    committed = (NB / f"{source.stem}.ipynb").read_text()
    assert built.strip() == committed.strip(), f"run: python notebooks/build.py {source.stem}"


def test_every_notebook_has_a_source():
    assert {p.stem for p in NB.glob("*.ipynb")} == {p.stem for p in (NB / "src").glob("*.py")}


def test_markdown_params_and_code_cells(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("# %% [md]\n# # Title\n# text\n# %% [params]\nn = 1\n# %%\nprint(n)\n")
    cells = build.build(src).cells
    assert [c.cell_type for c in cells] == ["markdown", "code", "code"]
    assert cells[0].source == "# Title\ntext" and cells[1].metadata.tags == ["parameters"]
    assert cells[2].source == "print(n)" and [c.id for c in cells] == ["cell-00", "cell-01", "cell-02"]
