"""The calibrate stage keeps refusals as safety examples: against a planted judge (a response refuses iff it holds
MARK and is not degenerate) and a planted generator (greedy and seeded-sampled answers fixed per prompt and seed),
compliant and degenerate responses are re-drawn, the still-compliant ones dropped or filled to min_kept, repeats
re-answered only by refusals, the utility set left alone, and every count in metrics.json equals a brute-force
recount."""
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from saferegions import calibration, config
from saferegions.io import read_jsonl, write_jsonl
from saferegions.judges.verdicts import Verdicts
from saferegions.methods.context import Context
from saferegions.stages import calibrate

MARK = "NO-GO"
SAME = f"{MARK} I cannot help with that."            # one refusal sentence: the distinctness rule must fire
SIZES = {"advbench": 8, "harmbench": 6}
GREEDY_REFUSED = {"advbench": {0, 4}, "harmbench": set()}
DEGENERATE = {"advbench": {5}, "harmbench": set()}     # holds MARK, but degenerate text is no refusal
REDRAWS, MIN_KEPT = 2, 5


class MarkerJudge:
    def judge(self, prompts, responses):
        refused = np.array([MARK in r for r in responses], bool)
        return Verdicts(~refused, (~refused).astype(float), refused)


def _parse(prompt):
    name, i = prompt.rsplit(" ", 1)
    return name, int(i)


def sampled_refuses(i, seed):
    """Planted sampling: a re-draw pass (seed k >= 1) refuses iff (i + k) % 3 == 0, so prompts with i % 3 == 2
    recover at pass 1, i % 3 == 1 at pass 2 and i % 3 == 0 never; the repeat pass (seed 0) refuses iff i is even."""
    return i % 2 == 0 if seed == 0 else (i + seed) % 3 == 0


def answer(prompt, do_sample, seed):
    name, i = _parse(prompt)
    if name == "alpaca":
        return f"{MARK} no thanks {i}." if i == 1 else f"Here is answer {i} for the task."
    if not do_sample:
        if i in DEGENERATE[name]:
            return " ".join([MARK] * 6)
        return SAME if i in GREEDY_REFUSED[name] else f"Sure, here is a plan for {name} {i}."
    if sampled_refuses(i, seed):
        return SAME if seed else f"{MARK} not request {i}."
    return f"Sure, sampled plan {i} seed {seed}."


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """calibrate.run over planted prompts, generator and judge; returns (cfg, frame, generate calls)."""
    monkeypatch.chdir(tmp_path)
    rows = [{"dataset": d, "split": "ident", "prompt": f"{d} {i}"} for d, n in SIZES.items() for i in range(n)]
    rows += [{"dataset": "alpaca", "split": s, "prompt": f"alpaca {i}"} for s in ("ident", "eval") for i in range(4)]
    write_jsonl(tmp_path / "artifacts/data/prompts.jsonl", rows)
    raw = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    raw["calibrate"].update(datasets=list(SIZES), n=8, redraws=REDRAWS, min_kept=MIN_KEPT, n_utility_eval=2)
    cfg = config.parse(raw)
    calls = []

    def generate(model, tok, prompts, max_new_tokens=64, batch_size=16, system=None, do_sample=False, seed=0,
                 desc="", with_finished=False, **kw):
        calls.append({"prompts": list(prompts), "do_sample": do_sample, "seed": seed})
        out = [answer(p, do_sample, seed) for p in prompts]
        return (out, [True] * len(out)) if with_finished else out

    monkeypatch.setattr(calibration.chat, "generate", generate)
    monkeypatch.setattr(calibrate.judges, "get", lambda kind, cfg: MarkerJudge())
    monkeypatch.setattr(calibrate.models, "load", lambda *a, **k: (torch.nn.Linear(1, 1), None))
    return cfg, calibrate.run(cfg, "aligned"), calls


def recount(name, n):
    """Brute force from the planted answers: per prompt refused greedily / recovered / neither, then the fill."""
    greedy = [i in GREEDY_REFUSED[name] for i in range(n)]
    recovered = [not greedy[i] and any(sampled_refuses(i, k) for k in range(1, REDRAWS + 1)) for i in range(n)]
    refusing = [g or r for g, r in zip(greedy, recovered)]
    fill = [i for i in range(n) if not refusing[i]][:max(0, MIN_KEPT - sum(refusing))]
    return {"n_asked": n, "n_refused_greedy": sum(greedy), "n_recovered": sum(recovered),
            "n_filled": len(fill), "n_dropped": n - sum(refusing) - len(fill), "n": sum(refusing) + len(fill),
            "refusal_rate": sum(greedy) / n, "kept": sorted([i for i in range(n) if refusing[i]] + fill)}


def test_safety_examples_are_refusals_and_counts_match_a_recount(stage, tmp_path):
    cfg, frame, calls = stage
    calibrate.write_metrics(cfg, "aligned", calibrate.refusal_rates(frame), tmp_path / "res")
    sets = json.loads((tmp_path / "res" / "metrics.json").read_text())["sets"]
    saved = read_jsonl(calibrate.out_dir("aligned") / "calibration.jsonl")
    for name, n in SIZES.items():
        want = recount(name, n)
        kept = [r for r in saved if r["dataset"] == name]
        assert [_parse(r["prompt"])[1] for r in kept] == want.pop("kept")
        assert {k: sets[name][k] for k in want} == want
        assert sum(MARK not in r["response"] for r in kept) == want["n_filled"]     # all else refuses
        assert sets[name]["n_sampled"] == sum(r["sampled"] for r in kept)
        assert sets[name]["n_distinct"] == len({r["response"] for r in kept})
    # the planted values, so a recount that drifted with the code would not pass either
    assert [sets["advbench"][k] for k in ("n_refused_greedy", "n_recovered", "n_dropped", "n_filled", "n")] == \
        [2, 4, 2, 0, 6]
    assert [sets["harmbench"][k] for k in ("n_refused_greedy", "n_recovered", "n_dropped", "n_filled", "n")] == \
        [0, 4, 1, 1, 5]
    alpaca = [r for r in saved if r["dataset"] == "alpaca"]
    assert [r["response"] for r in alpaca] == [answer(f"alpaca {i}", False, 0) for i in range(4)]   # left alone
    assert sets["alpaca"]["n"] == 4 and sets["alpaca"]["n_dropped"] == 0 and sets["alpaca"]["n_recovered"] == 0
    # re-draw passes: seeded run.seed + k, only over safety prompts not refusing yet (the degenerate one included)
    passes = [c for c in calls if c["do_sample"] and c["seed"] > 0]
    assert [c["seed"] for c in passes] == [1, 2]
    assert sorted(passes[0]["prompts"]) == sorted(f"advbench {i}" for i in (1, 2, 3, 5, 6, 7)) + \
        sorted(f"harmbench {i}" for i in range(6))
    assert sorted(passes[1]["prompts"]) == sorted(["advbench 1", "advbench 3", "advbench 6", "advbench 7",
                                                   "harmbench 0", "harmbench 1", "harmbench 3", "harmbench 4"])


def test_repeats_are_re_answered_after_the_filter_and_only_by_refusals(stage):
    _, frame, calls = stage
    repeat_pass = [c for c in calls if c["do_sample"] and c["seed"] == 0]
    assert len(repeat_pass) == 1           # one pass over the kept rows' repeats, after the re-draws
    assert sorted(repeat_pass[0]["prompts"]) == ["advbench 1", "advbench 2", "advbench 4", "advbench 5",
                                                  "advbench 7", "harmbench 2", "harmbench 4", "harmbench 5"]
    kept = frame[frame.kept]
    by = {r.prompt: r for r in kept.itertuples()}
    assert by["advbench 2"].response == f"{MARK} not request 2." and by["advbench 2"].sampled
    assert by["advbench 1"].response == SAME and not by["advbench 1"].sampled     # compliant re-answer refused
    assert set(frame[~frame.kept].prompt) == {"advbench 3", "advbench 6", "harmbench 3"}


def test_top_up_skips_the_asked_prompts_and_keeps_refusals(tmp_path):
    rows = [{"dataset": "advbench", "split": "ident", "prompt": f"advbench {i}"} for i in range(10)]
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    asked = []

    def refusals(prompts):
        asked.extend(prompts)
        return [{"prompt": p, "response": SAME, "finished": True} for p in prompts if _parse(p)[1] % 2 == 0]

    calib = {"advbench": (["advbench 0", "advbench 2"], [SAME, SAME], [True, True]), "alpaca": (["a"], ["b"], [True])}
    ctx = Context(None, None, "aligned", "tiny", calib, ["advbench"], "alpaca", None,
                  prompts_path=str(tmp_path / "prompts.jsonl"), asked={"advbench": 4}, refusals=refusals)
    ctx.top_up(["advbench", "alpaca"], 1)
    assert ctx.calib is calib                                  # nothing needed
    ctx.top_up(["advbench"], 5)
    assert asked == ["advbench 4", "advbench 5", "advbench 6"]   # after the 4 calibrate asked; 3 more wanted
    assert ctx.calib["advbench"][0] == ["advbench 0", "advbench 2", "advbench 4", "advbench 6"]
    bad = Context(None, None, "aligned", "tiny", {**calib, "advbench": (["advbench 5"], [SAME], [True])},
                  ["advbench"], "alpaca", None, prompts_path=str(tmp_path / "prompts.jsonl"), asked={"advbench": 4},
                  refusals=refusals)
    with pytest.raises(ValueError, match="not among the first ident prompts"):
        bad.top_up(["advbench"], 5)


@pytest.mark.parametrize("change, fragment", [({"min_kept": 20}, "exceeds calibrate.n"),
                                              ({"redraws": -1}, "calibrate.redraws"),
                                              ({"min_kept": 0}, "calibrate.min_kept")])
def test_calibrate_params_errors(change, fragment):
    raw = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    raw["calibrate"].update(n=16, **change)
    with pytest.raises(config.ConfigError, match=fragment):
        config.parse(raw)
