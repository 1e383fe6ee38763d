"""Re-judging discordant pairs at a longer length: a planted case where the long answers are known, so the
bookkeeping (which prompts are re-generated under which edit, the agreement, the substituted effect) is checked
against counts by hand."""
import contextlib

import pytest

from saferegions import evidence, rejudge
from saferegions.evaluation import Evaluation, Outcome

C, R = Outcome.COMPLIED, Outcome.REFUSED
PROMPTS = [f"p{i}" for i in range(8)]


def _ev(outcomes):
    return Evaluation(PROMPTS, [""] * len(outcomes), list(outcomes))


def test_discordant_pairs_are_regenerated_once_per_arm_and_substituted(monkeypatch):
    short = {"region": _ev([C, C, C, R, R, C, R, R]),
             "matched": _ev([R, R, C, R, R, C, C, R]),   # discordant with region at 0, 1, 6
             "intact": _ev([R, C, C, R, R, C, R, R])}    # discordant with region at 0
    # the long answers: region keeps complying at 0, turns to refusal at 1; matched complies at 6 and 1
    long = {"region": {0: C, 1: R, 6: R}, "matched": {0: R, 1: C, 6: C}, "intact": {0: C}}
    active, calls = [], []

    def edit(arm):
        @contextlib.contextmanager
        def apply():
            active.append(arm)
            yield
            active.pop()
        return apply

    def fake_evaluate(model, tok, prompts, judge, max_new_tokens, batch_size, system=None, desc=""):
        arm = active[-1]
        calls.append((arm, list(prompts), max_new_tokens))
        return Evaluation(list(prompts), [""] * len(prompts), [long[arm][PROMPTS.index(p)] for p in prompts])

    monkeypatch.setattr(rejudge, "evaluate", fake_evaluate)
    comps = [rejudge.Comparison("region_vs_matched", "region", "matched"),
             rejudge.Comparison("region_vs_intact", "region", "intact")]
    out = rejudge.rejudge(None, None, comps, short, {a: edit(a) for a in short}, None, 128, 4)
    assert sorted(calls) == [("intact", ["p0"], 128), ("matched", ["p0", "p1", "p6"], 128),
                             ("region", ["p0", "p1", "p6"], 128)]          # one generation per arm, union of pairs
    m = out["region_vs_matched"]
    assert m["n_discordant"] == 3
    # short outcomes at 0, 1, 6: region C C R, matched R R C; long: region C R R, matched R C C -> 4 of 6 agree
    assert m["agreement"]["n"] == 6 and m["agreement"]["effect"] == pytest.approx(4 / 6)
    assert m["effect_short"]["effect"] == pytest.approx((2 - 1) / 8)
    # long substituted: region C R C R R C R R (3 complied), matched R C C R R C C R (4) -> -1/8, 3 discordant
    assert m["effect_rejudged"]["effect"] == pytest.approx(-1 / 8)
    assert m["effect_rejudged"]["discordant"] == 3
    i = out["region_vs_intact"]
    assert i["n_discordant"] == 1 and i["agreement"]["effect"] == pytest.approx(0.5)
    assert i["effect_rejudged"]["effect"] == 0.0
    ref = evidence.paired_proportions([True, False, True, False, False, True, False, False],
                                      [False, True, True, False, False, True, True, False])
    assert m["effect_rejudged"]["ci"] == list(ref.ci)


def test_no_discordant_pair_generates_nothing(monkeypatch):
    monkeypatch.setattr(rejudge, "evaluate", lambda *a, **k: pytest.fail("nothing to re-judge"))
    same = {"a": _ev([C, R] * 4), "b": _ev([C, R] * 4)}
    out = rejudge.rejudge(None, None, [rejudge.Comparison("a_vs_b", "a", "b")], same,
                          {"a": contextlib.nullcontext, "b": contextlib.nullcontext}, None, 64, 4)
    assert out["a_vs_b"]["n_discordant"] == 0 and out["a_vs_b"]["agreement"] is None
