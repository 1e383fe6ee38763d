"""The notebooks' HTML, read as a reader sees it in a real browser (headless Chromium): no code input, no `nan`,
and no number in a table with more than 4 decimals.

Checked on the committed results/report/notebook.html and on a tiny notebook executed and rendered here by the
stage runner's own `render_html`; the same checks must fail on the default nbconvert export of that notebook
(code) and on pandas' own table (`NaN`, 16 digits), so they cannot pass vacuously."""
import os
import re
import shutil
import subprocess

import nbformat
import pytest
from bs4 import BeautifulSoup
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from conftest import ROOT

REPORT = ROOT / "results" / "report" / "notebook.html"
NAN = re.compile(r"\bnan\b", re.IGNORECASE)
DECIMALS = re.compile(r"\d\.(\d+)")
ARXIV_ID = re.compile(r"arXiv:\d{4}\.\d{4,5}")   # an identifier, not a number

TINY_CODE = """\
import pandas as pd
from IPython.display import display
from saferegions import tables

display(tables.params_table(params))
status = pd.DataFrame({"stage": ["data", "identify"], "items": [None, 5]}).set_index("stage")
display(tables.table(status, missing={"items": "n/a (not a matrix stage)"}))
rates = pd.DataFrame({"set": ["advbench", "benign"], "refusal_rate": [0.13846153846153847, float("nan")],
                      "refusal_rate_ci": [[0.10712345678901234, 0.16812345678901234], None],
                      "density": [0.000123456789, 0.5]})
display(tables.table(rates, index=False))"""


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return path


def rendered(chromium, html_path) -> BeautifulSoup:
    """The DOM after Chromium has loaded and laid out the page."""
    done = subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
                           html_path.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    dom = BeautifulSoup(done.stdout, "html.parser")
    for hidden in dom(["script", "style", "template", "noscript", "head"]):
        hidden.decompose()
    return dom


def problems(dom: BeautifulSoup) -> list[str]:
    """What a reader should not see: code input, `nan`, table numbers with more than 4 decimals."""
    found = [f"code input: {area.get_text(' ', strip=True)[:80]!r}"
             for area in dom.select(".jp-CodeCell .jp-InputArea, .jp-CodeCell .jp-Editor")]
    text = dom.get_text(" ", strip=True)
    found += [f"nan: …{text[max(0, m.start() - 60):m.end() + 20]}…" for m in NAN.finditer(text)]
    for cell in dom.select("table td, table th"):
        value = ARXIV_ID.sub("arXiv", cell.get_text(" ", strip=True))
        if any(len(m.group(1)) > 4 for m in DECIMALS.finditer(value)):
            found.append(f"more than 4 decimals: {value[:80]!r}")
    return found


@pytest.fixture(scope="module")
def tiny_notebook(tmp_path_factory):
    """A two-cell notebook executed by papermill as `saferegions.stage` executes a stage's."""
    import papermill as pm
    folder = tmp_path_factory.mktemp("tiny")
    params = new_code_cell("params = {}")
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# A tiny stage"), params, new_code_cell(TINY_CODE)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, folder / "tiny.ipynb")
    with pytest.MonkeyPatch.context() as mp:   # the kernel imports this checkout's saferegions
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        pm.execute_notebook(str(folder / "tiny.ipynb"), str(folder / "executed.ipynb"), kernel_name="python3",
                            parameters={"params": {"run": {"seed": 1, "device": "auto"},
                                                   "baseline": {"datasets": ["advbench", "alpaca"],
                                                                "temperature": 0.123456789}}},
                            progress_bar=False, cwd=str(folder))
    return nbformat.read(str(folder / "executed.ipynb"), as_version=4), folder


def test_stage_html_is_readable(chromium, tiny_notebook):
    from saferegions.stage import render_html
    nb, folder = tiny_notebook
    path = folder / "stage.html"
    path.write_text(render_html(nb))
    dom = rendered(chromium, path)
    assert problems(dom) == []
    text = dom.get_text(" ", strip=True)
    assert "import pandas" not in text and "params = {" not in text   # the code and papermill's injected params
    assert "0.138 [0.107, 0.168]" in text and "n/a (not a matrix stage)" in text and "1.23e-04" in text
    params = [t for t in dom.select("table") if "temperature" in t.get_text()]
    assert params and "advbench, alpaca" in params[0].get_text(" ") and "0.123" in params[0].get_text(" ")


def test_the_checks_catch_what_the_old_html_showed(chromium, tiny_notebook):
    """The default export shows the code; pandas' own table shows `NaN` and 16-digit numbers."""
    import pandas as pd
    from nbconvert import HTMLExporter
    nb, folder = tiny_notebook
    default, raw = folder / "default.html", folder / "raw.html"
    default.write_text(HTMLExporter().from_notebook_node(nb)[0])
    assert any(p.startswith("code input") for p in problems(rendered(chromium, default)))
    frame = pd.DataFrame({"rate": [0.13846153846153847, float("nan")], "ci": [[0.10712345678901234, 0.2], None]})
    raw.write_text(f"<html><body>{frame.to_html()}</body></html>")
    found = problems(rendered(chromium, raw))
    assert any(p.startswith("nan") for p in found) and any(p.startswith("more than 4") for p in found)


def test_committed_report_is_readable(chromium):
    assert REPORT.exists(), "results/report/notebook.html is missing"
    dom = rendered(chromium, REPORT)
    assert dom.select(".jp-CodeCell"), "no notebook cells in the report"
    assert problems(dom) == []
