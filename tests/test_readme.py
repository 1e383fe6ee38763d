"""README.md: its tables render (issue 16: rows pasted into the wrong table broke two), and its generated blocks
equal what `python -m saferegions.readme` makes of the committed results/, so its numbers cannot go stale."""
import json
import re

import pytest

from conftest import ROOT
from saferegions import readme


def _cells(row: str) -> list[str]:
    """A table row's cells as GitHub splits them: on every pipe not escaped as \\|, inside code spans too."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def _tables(text: str):
    """(line number, rows) per Markdown table outside fenced code blocks."""
    out, rows, fenced = [], [], False
    for i, line in enumerate(text.splitlines() + [""], 1):
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("|"):
            rows.append((i, line))
        elif rows:
            out.append(rows)
            rows = []
    return out


def _code_pipes(row: str) -> bool:
    """True if an unescaped pipe sits in a code span (GitHub would split the cell there)."""
    return any(re.search(r"(?<!\\)\|", code) for _, code in re.findall(r"(`+)(.+?)\1", row))


def _check_tables(text: str) -> list[str]:
    problems = []
    for rows in _tables(text):
        first, header = rows[0]
        n = len(_cells(header))
        rule = _cells(rows[1][1]) if len(rows) > 1 else []
        if len(rule) != n or not all(re.fullmatch(r":?-+:?", c) for c in rule):
            problems.append(f"line {first}: no delimiter row of {n} cells under the header")
        for i, row in rows[1:]:
            if len(_cells(row)) != n:
                problems.append(f"line {i}: {len(_cells(row))} cells, header has {n}")
            if _code_pipes(row):
                problems.append(f"line {i}: unescaped | in a code span")
    return problems


def test_every_readme_table_has_its_headers_cell_count():
    assert _check_tables((ROOT / "README.md").read_text()) == []


def test_table_check_catches_the_issue_16_breakages():
    good = "| a | b `x\\|y` | c |\n|---|---|---|\n| 1 | 2 \\| 3 | 4 |\n"
    assert _check_tables(good) == []
    assert _check_tables("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n")                # a row from another table
    assert _check_tables("| a | b | c | d |\n|---|---|---|\n| 1 | 2 | 3 | 4 |\n")   # header from another table
    assert _check_tables("| a | b |\n|---|---|\n| `x|y` | 2 |\n")                 # a pipe in code splits
    assert _check_tables("```\n| a | b |\n| 1 |\n```\n") == []                   # code blocks are not tables


def test_readme_generated_blocks_match_the_committed_results():
    text = (ROOT / "README.md").read_text()
    assert readme.render(text, ROOT) == text, "README is stale: run `python -m saferegions.readme`"
    assert readme.main(["--root", str(ROOT), "--check"]) == 0


def _fake_results(root):
    def put(rel, obj):
        path = root / "results" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    put("baseline/timing.json", {"wall_seconds": 2.5})
    put("identify/m-snip/timing.json", {"wall_seconds": 1.25})
    put("identify/m-wanda/timing.json", {"wall_seconds": 3.0})
    put("identify/m-snip/metrics.json", {"method": "snip", "role": "m", "datasets": {
        d: {"raw": {"density": 0.02}, "refined": {"density": 0.01}} for d in ("advbench", "harmbench")}})
    put("overlap/metrics.json", {"m": {"snip": {"raw": {"mean_iou": 0.3, "chance_iou": 0.01},
                                                "refined": {"mean_iou": None, "chance_iou": None}}}})
    put("set/metrics.json", {"set": {"asr_before": 0.875, "asr_after": 0.375, "utility_after": 0.5,
                                     "trainable_fraction": 0.01}})
    part = lambda name, **kw: {"name": name, "role": "part", "condition": None, "metric": "", "n": 0,  # noqa: E731
                               "effect": None, "ci": None, "ci_one_flip": None, "test": None, "p": None,
                               "p_holm": None, "threshold": 0.5, "direction": "<", "margin": None,
                               "verdict": "not run", "reason": None, **kw}
    put("report/claims.json", {
        "c1": {"claim": "a | b", "paper": "p", "this_run": "x → y", "verdict": "not run", "stage": "validate",
               "reason": "not testable here: ctl", "parts": [
                   part("gap", condition="m/snip", metric="refusal-onset rate (printed as ASR): keyword judge", n=96,
                        effect=0.25, ci=[0.125, 0.375], ci_one_flip=[0.11, 0.39], test="exact McNemar", p=0.0001,
                        discordant=30, mde=0.1234, p_holm=0.0002, threshold=0.1, direction=">", verdict="supported"),
                   part("ratio", metric="utility ratio", n=32, effect=0.95, ci=[0.91, 0.99], p=0.02, p_holm=0.04,
                        threshold=0.9, direction=">", margin=0.1, verdict="supported"),
                   part("ctl", role="control", reason="results/x/metrics.json has no y")]},
        "c2": {"claim": "c", "paper": "p", "this_run": "not run", "verdict": "not run",
               "reason": "not testable here: low", "parts": [part("low")]}})
    put("validate/metrics.json", {"m": {"snip": {"advbench": {
        "region": {"asr": 0.5, "degenerate_rate": 0.0}, "random": {"asr": 0.25, "degenerate_rate": 0.0},
        "n": 96, "n_utility": 32, "utility_ratio": 0.95,
        "paired": {"n": 96, "effect": 0.25, "ci": [0.125, 0.375], "test": "exact McNemar", "p": 0.001}}}}})


TEMPLATE = ("# T\n\nprose 1.5\n\n<!-- generated:timings -->\nold\n<!-- /generated:timings -->\n\n"
            "<!-- generated:findings -->\n<!-- /generated:findings -->\nend\n")


def test_generator_on_a_tiny_results_dir(tmp_path):
    _fake_results(tmp_path)
    (tmp_path / "README.md").write_text(TEMPLATE)
    assert readme.main(["--root", str(tmp_path), "--check"]) == 1               # blocks not written yet
    assert readme.main(["--root", str(tmp_path)]) == 0
    out = (tmp_path / "README.md").read_text()
    assert readme.main(["--root", str(tmp_path), "--check"]) == 0
    assert readme.render(out, tmp_path) == out                                    # same results, same bytes
    assert out.startswith("# T\n\nprose 1.5\n\n") and out.endswith("<!-- /generated:findings -->\nend\n")
    assert "| identify | 4.2 | m-snip 1.2 · m-wanda 3.0 |" in out                # summed, items listed
    assert "| data | not run |  |" in out and "| **all stages** | **6.8** |  |" in out
    assert "| m/snip | 2 | 0.300 (0.010) | – (–) |" in out                         # undefined IoU, datasets
    assert "| set | 1.00% | 0.875 → 0.375 |" in out
    assert "| m/snip | advbench | 0.50 | 0.25 | 0.25 [0.125, 0.375] | 0.95 | 96 |" in out    # paired, CI, n
    assert "| **a \\| b** | p | not testable here: ctl |  |  |  |  |  |  | **not run** |" in out      # claim, pipes
    assert "| ↳ gap |  | m/snip | 0.25 [0.125, 0.375] | [0.11, 0.39] | 96 | 0.123 | < 0.001 | > 0.10 | supported |" in out
    assert "| ↳ ratio |  | – | 0.95 [0.91, 0.99] | – | 32 | – | 0.040 | > 0.90 (margin 0.10) | supported |" in out
    assert "| ↳ ctl (control) |  | – | – | – | 0 | – | – | < 0.50 | not run: results/x/metrics.json has no y |" \
        in out
    assert "| **c** | p | not testable here: low |" in out and "| ↳ low |" in out
    assert "- gap: refusal-onset rate (printed as ASR): keyword judge\n- ratio: utility ratio" in out
    assert "| 0.95 | 96 |\n\nASR here: refusal-onset rate — keyword judge.\n" in out      # named under the table
    assert _check_tables(out) == []
    (tmp_path / "results/set/metrics.json").unlink()                              # results changed: stale
    assert readme.main(["--root", str(tmp_path), "--check"]) == 1


def test_a_claims_file_without_parts_is_an_error(tmp_path):
    _fake_results(tmp_path)
    (tmp_path / "results/report/claims.json").write_text(json.dumps({"c1": {"claim": "a", "verdict": "supported"}}))
    with pytest.raises(ValueError, match="c1 has no parts"):
        readme.findings(tmp_path)


def test_a_missing_block_is_an_error(tmp_path):
    _fake_results(tmp_path)
    with pytest.raises(ValueError, match="findings"):
        readme.render(TEMPLATE.replace("generated:findings", "generated:other"), tmp_path)
