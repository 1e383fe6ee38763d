"""The typed result contract: every committed metrics.json reads into its stage's record and writes back as the
same JSON, a shape error names the file and key, and no module but evidence.py produces or decides a verdict."""
import ast
import json
import re

import pytest

from conftest import ROOT
from saferegions import evidence, results

COMMITTED = sorted(ROOT.glob("results/*/metrics.json")) + sorted(ROOT.glob("results/*/*/metrics.json"))


def _stage(path):
    return path.relative_to(ROOT / "results").parts[0]


def test_every_stage_has_a_record_and_some_committed_results_exist():
    assert set(results.STAGES) | {"report"} == set(results.METRICS)
    assert {_stage(p) for p in COMMITTED} >= {"baseline", "identify", "validate", "set", "spa"}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_committed_metrics_round_trip_through_their_record(path, tmp_path):
    stage = _stage(path)
    record = results.read(stage, path)
    assert type(record) is results.METRICS[stage]
    out = tmp_path / "metrics.json"
    results.save(stage, out, record)
    assert json.loads(out.read_text()) == json.loads(path.read_text())
    assert out.read_text() == path.read_text()   # byte for byte: same keys, values and layout


def test_records_type_what_the_readers_use():
    r = results.load_results(ROOT)
    assert isinstance(r["set"], results.SetMetrics) and "set" in r["set"].arms
    set_est = r["set"].comparison["set_relative_reduction"].estimate()
    raw = json.loads((ROOT / "results/set/metrics.json").read_text())["comparison"]["set_relative_reduction"]
    assert (set_est.n, set_est.effect, list(set_est.ci)) == (raw["n"], raw["effect"], raw["ci"])
    assert all(isinstance(m, results.IdentifyMetrics) for m in r["identify"].values())


def test_save_refuses_a_wrong_shape_before_writing(tmp_path):
    out = tmp_path / "metrics.json"
    with pytest.raises(results.MetricsError, match=r"gsm8k\.spa\.asr_after: 1\.5 outside"):
        results.save("spa", out, {"gsm8k": {"spa": {"asr_before": 0.1, "asr_after": 1.5, "task_score": 0.0}}})
    with pytest.raises(results.MetricsError, match=r"missing key\(s\) \['spa'\]"):
        results.save("spa", out, {"gsm8k": {"full": {"asr_before": 0.1, "asr_after": 0.2, "task_score": 0.0}}})
    assert not out.exists()


VERDICT_WORD = re.compile(r"^\W*(supported|contradicted|inconclusive)\b", re.I)


def _verdict_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants (f-string pieces too) that start with a verdict word; docstrings excluded."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings and VERDICT_WORD.search(n.value)]


def test_only_evidence_produces_a_verdict_word():
    """`evidence.verdict` is the one function that decides a claim; anywhere else a verdict string would be a
    second, unchecked decision (others use the `evidence.Verdict` values)."""
    found = {}
    for f in sorted((ROOT / "src").rglob("*.py")):
        if f.name == "evidence.py" and f.parent.name == "saferegions":
            continue
        hits = _verdict_strings(ast.parse(f.read_text()))
        if hits:
            found[str(f.relative_to(ROOT))] = hits
    assert not found, f"verdict words outside evidence.py: {found}"


def test_the_scan_finds_a_planted_verdict():
    planted = ast.parse('def f(x):\n    """supported in a docstring is prose."""\n'
                        '    return "supported" if x else f"{x}; inconclusive because y"\n')
    assert sorted(s for _, s in _verdict_strings(planted)) == ["; inconclusive because y", "supported"]
    assert _verdict_strings(ast.parse('raise ValueError("layouts are not supported")')) == []


# An interval, effect, margin or claim threshold compared by order (<, >, <=, >=) is a verdict being decided.
# A bare local `threshold` is allowed (a classifier's cut-off); a spec's or record's `.threshold` is not.
DECIDING_NAME = re.compile(r"effect|margin|^ci$|^ci_|_ci$|^THRESHOLDS$|^PARTS$", re.I)
DECIDING_FIELD = re.compile(r"effect|margin|threshold|direction|^ci$|^ci_|_ci$", re.I)
VERDICT_MEMBERS = {m.name for m in evidence.Verdict}


def _walk_outside_calls(node: ast.AST):
    """ast.walk, but not into a call's arguments: `power(n, effect) < 0.8` passes an effect on, it orders none."""
    yield node
    for c in ast.iter_child_nodes(node):
        if isinstance(node, ast.Call) and c is not node.func:
            continue
        yield from _walk_outside_calls(c)


def _deciding_names(node: ast.AST):
    for n in _walk_outside_calls(node):
        if isinstance(n, ast.Name) and DECIDING_NAME.search(n.id):
            yield n.id
        elif isinstance(n, ast.Attribute) and (DECIDING_FIELD.search(n.attr) or DECIDING_NAME.search(n.attr)):
            yield n.attr
        elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str) \
                and DECIDING_FIELD.search(n.slice.value):
            yield n.slice.value


def _is_verdict(node: ast.AST) -> bool:
    return getattr(node, "id", None) == "Verdict" or getattr(node, "attr", None) == "Verdict"


def _checks_input(n: ast.AST, parents: dict) -> bool:
    """The comparison is (part of) an `if` test whose whole body raises: a check of bad input, not a verdict."""
    while id(n) in parents and not isinstance(parents[id(n)], ast.If):
        n = parents[id(n)]
        if isinstance(n, ast.stmt):
            return False
    p = parents.get(id(n))
    return isinstance(p, ast.If) and p.test is n and all(isinstance(b, ast.Raise) for b in p.body)


def _verdict_decisions(tree: ast.AST) -> list[tuple[int, str]]:
    """Where a module decides a verdict itself: it constructs a Verdict, picks a Verdict member as a value
    (comparing with one or keying a dict by one only reads it), or orders an effect / interval / margin /
    claim threshold."""
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and _is_verdict(n.func):
            found.append((n.lineno, "constructs a Verdict"))
        elif isinstance(n, ast.Attribute) and n.attr in VERDICT_MEMBERS and _is_verdict(n.value):
            p = parents.get(id(n))
            if not (isinstance(p, ast.Compare) or (isinstance(p, ast.Dict) and any(k is n for k in p.keys))):
                found.append((n.lineno, f"picks Verdict.{n.attr}"))
        elif isinstance(n, ast.Compare) and any(isinstance(o, (ast.Lt, ast.Gt, ast.LtE, ast.GtE)) for o in n.ops) \
                and not _checks_input(n, parents):
            names = sorted(set(_deciding_names(n)))
            if names:
                found.append((n.lineno, f"orders {', '.join(names)}"))
    return found


def test_only_evidence_decides_a_verdict():
    """`evidence.verdict` / `evidence.conjunction` decide every part and claim; a module that builds a Verdict or
    sets an effect or interval against a threshold itself would be a second, unchecked decision."""
    found = {}
    for f in sorted((ROOT / "src").rglob("*.py")):
        if f.name == "evidence.py" and f.parent.name == "saferegions":
            continue
        hits = _verdict_decisions(ast.parse(f.read_text()))
        if hits:
            found[str(f.relative_to(ROOT))] = hits
    assert not found, f"verdicts decided outside evidence.py: {found}"


def test_the_decision_scan_finds_planted_decisions_and_passes_readings():
    planted = ast.parse(
        "v = Verdict('supported')\n"                                            # 1 constructs
        "w = evidence.Verdict.SUPPORTED if x else evidence.Verdict.NOT_RUN\n"   # 2 picks twice
        "ok = est.ci[0] > THRESHOLDS['c'][0]\n"                                 # 3 orders ci, THRESHOLDS
        "bad = effect >= 0.1\n"                                                 # 4 orders effect
        "y = row['ci'][0] > row['threshold']\n"                                 # 5 orders ci, threshold
        "guard = deg - deg_random >= est.effect\n")                             # 6 orders effect
    assert sorted({line for line, _ in _verdict_decisions(planted)}) == [1, 2, 3, 4, 5, 6]
    assert len([h for h in _verdict_decisions(planted) if h[0] == 2]) == 2
    readings = ast.parse("a = v == evidence.Verdict.SUPPORTED\nb = {Verdict.SUPPORTED: 'words'}\n"
                         "threshold = max(cuts)\nc = s > threshold\nd = len(x) < 12\n"
                         "e = len(effects) > 1\nf = power(n, effect) < 0.8\n"
                         "if not 0 < effect <= 1:\n    raise ValueError('effect')\n")
    assert _verdict_decisions(readings) == []
