"""Known answers for the overlap analysis (docs/methods.md §3.3-3.5): planned popcounts against bool references,
hand-made IoUs, chance baselines, the refinement identity on regions built like the identify artifacts,
convergence, profiles, and the prompt bootstrap on a tiny model."""
import itertools
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from saferegions import chat, config, overlap as O, regions as R, tiny
from saferegions.methods import wanda
from saferegions.methods.resample import bootstrap_ious

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (8, 16), "model.layers.0.mlp.down_proj.weight": (16, 24),
          "model.layers.1.self_attn.q_proj.weight": (8, 16), "model.layers.1.mlp.down_proj.weight": (16, 24)}


def rand_region(seed, density, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return R.Region({n: torch.rand(s, generator=g) < density for n, s in shapes.items()}, {"seed": seed})


def bool_iou(masks, scope, minus=None):
    per, tn, td = [], 0, 0
    for n in masks[0]:
        ms = torch.stack([m[n] for m in masks])
        keep = ~minus[n] if minus is not None else torch.ones_like(ms[0])
        i, u = int((ms.all(0) & keep).sum()), int((ms.any(0) & keep).sum())
        tn, td = tn + i, td + u
        if u:
            per.append(i / u)
    return tn / td if scope == "global" else float(np.mean(per))


def test_hand_made_counts():
    a = R.Region({"w": torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 0], dtype=torch.bool)})
    b = R.Region({"w": torch.tensor([0, 1, 1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)})
    u = R.Region({"w": torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)})
    c = O.count([a.packed("bits"), b.packed("idx"), u], ["a", "b", "u"],
                O.plan(["a", "b"], minus="u", orders=[["a", "b"]]))
    assert c.multiway(["a", "b"]) == 3 / 6            # ∩ = {1, 2, 8}, ∪ = {0, 1, 2, 3, 8, 9}
    assert c.refined("a", "b", "u") == 2 / 4          # ∩ \ U = {1, 8}, ∪ \ U = {0, 1, 3, 8}
    t = O.refinement_terms(c, "a", "b", "u")
    assert (t["u_frac_of_inter"], t["u_frac_of_union"]) == (1 / 3, 2 / 6)
    p = c.pairwise(names=["a", "b"])
    assert p[0, 1] == 0.5 and p[0, 0] == 1.0
    with pytest.raises(KeyError, match="not counted"):
        c.union(["a", "u"])
    with pytest.raises(ValueError, match="unknown names"):
        O.count([a, b], ["a", "b"], [O.inter_q(["a", "z"])])


@pytest.mark.parametrize("scope", ["global", "per_matrix"])
def test_counts_match_bool_reference_and_regions_iou(scope):
    regs = [rand_region(s, d) for s, d in zip(range(5), (0.02, 0.3, 0.5, 0.01, 0.2))]
    regs[3].masks["model.layers.1.mlp.down_proj.weight"][:] = False     # an empty tensor: skipped per matrix
    names = list("abcde")
    packed = [r.packed("idx" if i % 2 else "bits") for i, r in enumerate(regs)]
    orders = O.orderings(names[:4], 3, seed=1)
    c = O.count(packed, names, O.plan(names[:4], minus="e", orders=orders))
    for i, j in itertools.combinations(range(4), 2):
        want = bool_iou([regs[i].masks, regs[j].masks], scope)
        assert c.multiway([names[i], names[j]], scope) == pytest.approx(want)
        assert c.multiway([names[i], names[j]], scope) == pytest.approx(O.iou(packed[i], packed[j], scope))
        want = bool_iou([regs[i].masks, regs[j].masks], scope, regs[4].masks)
        assert c.refined(names[i], names[j], "e", scope) == pytest.approx(want)
    for order in orders:
        for k in range(2, 5):
            idx = [names.index(x) for x in order[:k]]
            want = O.multiway_iou([regs[i] for i in idx], scope)
            assert c.multiway(order[:k], scope) == pytest.approx(want)


def test_refinement_identity_on_artifact_like_regions(tmp_path):
    """Regions built as identify builds them (top-q per matrix of scores, utility = top-p,
    refined = raw \\ U), stored and reloaded in packed form: the refined IoU equals
    |(A ∩ B) \\ U| / |(A ∪ B) \\ U| exactly."""
    scores = [{n: torch.rand(s, generator=torch.Generator().manual_seed(k)) for n, s in SHAPES.items()}
              for k in range(4)]
    util = R.top_fraction(scores[3], 0.4)
    raw = {f"d{k}": R.top_fraction(scores[k], 0.2) for k in range(3)}
    refined = {d: R.difference(r, util) for d, r in raw.items()}

    def stored(region, name):
        R.save(region, tmp_path / f"{name}.safetensors")
        return R.load_packed(tmp_path / f"{name}.safetensors")

    res = O.analyze({d: stored(r, f"{d}.raw") for d, r in raw.items()},
                    {d: stored(r, f"{d}.refined") for d, r in refined.items()}, stored(util, "alpaca.utility"),
                    ["raw", "refined"], ["global", "per_matrix"], n_orders=2, seed=0, draws=100)
    assert all(res["exact"].values())
    for row in res["refinement"]:
        assert row["identity_iou"] == row["refined_iou"]
        assert (row["refined_iou"] < row["raw_iou"]) == (row["u_frac_of_inter"] > row["u_frac_of_union"])
    broken = dict(refined, d0=R.difference(raw["d0"], R.top_fraction(scores[2], 0.4)))   # not raw \ U
    res = O.analyze(raw, broken, util, ["raw", "refined"], ["global"], n_orders=1, seed=0, draws=100)
    assert not res["exact"]["d0"] and res["exact"]["d1"]


def test_chance_entries_matches_random_regions():
    big = {"model.layers.0.mlp.up_proj.weight": (400, 500), "model.layers.1.mlp.up_proj.weight": (300, 500)}
    a, b = rand_region(0, 0.05, big), rand_region(1, 0.2, big)
    c = O.count([a, b], ["a", "b"], O.plan(["a", "b"]))
    want = O.chance_iou(a.density, b.density)
    assert O.chance_entries(c, ["a", "b"]) == pytest.approx(want, rel=0.02)
    f = 0.02
    assert O.chance_iou(f) == pytest.approx(f / (2 - f))
    ra, rb = R.random_like(a, 5), R.random_like(b, 6)
    assert O.iou(ra, rb) == pytest.approx(O.chance_entries(c, ["a", "b"]), rel=0.05)
    assert O.corrected(want, want) == 0 and O.corrected(1.0, want) == 1


def test_chance_layers_matches_hypergeometric():
    L = 24
    exact = sum(math.comb(3, x) * math.comb(L - 3, 5 - x) / math.comb(L, 5) * x / (8 - x) for x in range(4))
    got = O.chance_layers([3, 5], {i: 7 for i in range(L)}, 20000, 0)
    assert got == pytest.approx(exact, abs=0.004)
    assert O.chance_layers([L, L], {i: 1 for i in range(L)}, 10, 0) == 1.0
    with pytest.raises(ValueError):
        O.chance_layers([L + 1, 1], {i: 1 for i in range(L)}, 10, 0)


def test_convergence_plateau_and_profiles():
    """A shared core plus dataset-specific noise: IoU_k levels off well above chance."""
    core = rand_region(100, 0.1)
    regs = {f"d{k}": R.union(core, rand_region(k, 0.02)) for k in range(5)}
    names = list(regs)
    orders = O.orderings(names, 4, 0)
    c = O.count(list(regs.values()), names, O.plan(names, orders=orders))
    rows = O.convergence(c, orders, "global", chance=lambda ns: O.chance_entries(c, ns))
    assert {r["k"] for r in rows} == {2, 3, 4, 5} and len(rows) == 16
    last = [r for r in rows if r["k"] == 5]
    assert all(r["iou"] > 5 * r["chance"] for r in last)
    assert all(r["survive"] >= core.size / max(x.size for x in regs.values()) - 1e-12 for r in last)
    by_layer = O.group_iou(c, names, lambda n: int(n.split(".")[2]))
    assert set(by_layer) == {0, 1} and all(0 < v < 1 for v in by_layer.values())
    dens = O.group_density(c, names, lambda n: int(n.split(".")[2]))
    assert all(0.1 <= v < 0.2 for v in dens.values())
    prof = O.depth_profile({0: 0.1, 1: 0.3, 2: 0.5}, points=5)
    assert prof[0] == pytest.approx(0.1) and prof[-1] == pytest.approx(0.5) and np.all(np.diff(prof) >= 0)
    assert O.same_space(regs["d0"], regs["d1"].packed())
    assert not O.same_space(regs["d0"], rand_region(0, 0.1, {"x": (2, 2)}))


def test_layer_regions_use_layer_chance():
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (4, 4) for i in range(6)}

    def layer_region(ids):
        masks = {n: torch.full(s, i in ids, dtype=torch.bool) for i, (n, s) in enumerate(shapes.items())}
        return R.Region(masks, {}, {"layers": sorted(ids)})

    raw = {"a": layer_region({0, 1}), "b": layer_region({1, 2}), "c": layer_region({1, 2, 3})}
    util = layer_region({2})
    refined = {d: R.Region(R.difference(r, util).masks, {}, {"layers": sorted(set(r.units["layers"]) - {2})})
               for d, r in raw.items()}
    res = O.analyze(raw, refined, util, ["raw", "refined"], ["global"], n_orders=2, seed=0, draws=5000)
    assert res["matrix"]["raw", "global"][0, 1] == pytest.approx(1 / 3)
    exact = sum(math.comb(2, x) * math.comb(4, 2 - x) / math.comb(6, 2) * x / (4 - x) for x in range(3))
    assert res["chance"]["raw", "global"][0, 1] == pytest.approx(exact, abs=0.02)
    assert all(res["exact"].values())
    # refined layer sets are drawn among the 5 layers U leaves: sizes 2 and 1 share a layer with p = 2/5
    assert res["chance"]["refined", "global"][0, 1] == pytest.approx(2 / 5 * 1 / 2, abs=0.015)


def test_refined_chance_is_drawn_outside_the_utility_region():
    """Refined regions lie in eligible \\ U: their chance IoU is that of random regions of the same per-matrix
    sizes drawn there. Planted: U takes 90% of one matrix and 80% of the other, so the refined regions are
    dense where they can be and the old density-over-numel formula understates chance about sevenfold."""
    shapes = {"model.layers.0.mlp.up_proj.weight": (100, 100), "model.layers.1.mlp.up_proj.weight": (60, 100)}
    util = R.Region({n: torch.arange(math.prod(s)).view(s) < (0.9 if "0" in n else 0.8) * math.prod(s)
                     for n, s in shapes.items()}, {})
    raw = {d: rand_region(k, 0.15, shapes) for k, d in enumerate(["a", "b", "c"])}
    refined = {d: R.difference(r, util) for d, r in raw.items()}
    res = O.analyze(raw, refined, util, ["raw", "refined"], ["global", "per_matrix"], n_orders=1, seed=0,
                    draws=10)
    g = torch.Generator().manual_seed(0)

    def draw(region):   # the region's per-matrix count at random entries outside U
        masks = {}
        for n, m in region.masks.items():
            free = torch.nonzero(~util.masks[n].flatten()).flatten()
            pick = free[torch.randperm(free.numel(), generator=g)[:int(m.sum())]]
            masks[n] = torch.zeros(m.numel(), dtype=torch.bool).index_fill_(0, pick, True).view(m.shape)
        return R.Region(masks, {})

    for scope in ("global", "per_matrix"):
        sim = np.mean([O.iou(draw(refined["a"]), draw(refined["b"]), scope) for _ in range(200)])
        old = O.chance_entries(res["counts"], ["a.refined", "b.refined"], scope)   # density over all entries
        got = res["chance"]["refined", scope][0, 1]
        assert got == pytest.approx(sim, rel=0.05) and got > 4 * old, (scope, got, sim, old)
    assert res["chance"]["raw", "global"][0, 1] == pytest.approx(0.15 / 1.85, rel=0.1)   # raw: unchanged
    # selection group 'global': drawn over all of eligible \\ U at once
    free = sum(int((~m).sum()) for m in util.masks.values())
    fa, fb = refined["a"].size / free, refined["b"].size / free
    pooled = O.chance_entries(res["counts"], ["a.refined", "b.refined"], "global", "utility", pooled=True)
    assert pooled == pytest.approx(fa * fb / (fa + fb - fa * fb))


def test_bootstrap_on_tiny_model():
    torch.manual_seed(0)
    model, tok = tiny.tiny_model("llama")
    calib = {d: ([f"prompt {d} {i}" for i in range(3)], [f"answer {i} for {d}" for i in range(3)])
             for d in ("advbench", "harmbench", "alpaca")}
    batches = list(chat.response_batches(tok, *calib["alpaca"], batch_size=4, max_length=32))
    util = R.top_fraction(wanda.wanda_scores(model, batches, progress=False), 0.04).packed()
    rows = bootstrap_ious(model, tok, calib, "wanda", ["advbench", "harmbench"], None, 0.02, "matrix", util,
                          n_resamples=2, seed=0, batch_size=4, max_length=32, progress=False)
    assert len(rows) == 2 and {r["pair"] for r in rows} == {"advbench–harmbench"}
    assert all(0 <= r["raw"] <= 1 and 0 <= r["refined"] <= 1 for r in rows)
    again = bootstrap_ious(model, tok, calib, "wanda", ["advbench", "harmbench"], None, 0.02, "matrix", util,
                           n_resamples=2, seed=0, batch_size=4, max_length=32, progress=False)
    assert again == rows                                  # seeded resampling
    snip_rows = bootstrap_ious(model, tok, calib, "snip", ["advbench", "harmbench"], 1, 0.02, "matrix", None,
                               n_resamples=1, seed=0, batch_size=4, max_length=32, progress=False)
    assert len(snip_rows) == 1 and "refined" not in snip_rows[0]
    with pytest.raises(ValueError, match="no per-example score to resample; resamplable: snip, wanda"):
        bootstrap_ious(model, tok, calib, "layer", ["advbench", "harmbench"], None, 0.02, "matrix", None, 1, 0)
    with pytest.raises(ValueError, match="two datasets"):
        bootstrap_ious(model, tok, calib, "wanda", ["advbench"], None, 0.02, "matrix", None, 1, 0)
    lo, hi = O.interval([0.1, 0.2, 0.3, float("nan")])
    assert lo == pytest.approx(0.105) and hi == pytest.approx(0.295)


def test_overlap_config():
    cfg = config.parse({"overlap": {"bootstrap": {"methods": ["wanda"], "datasets": ["advbench", "catqa"]}}})
    assert cfg.overlap.scopes() == ["global", "per_matrix"] and cfg.overlap.n_orders == 20
    for bad, msg in (({"scope": "rows"}, "overlap.scope"), ({"variants": ["cooked"]}, "overlap.variants"),
                     ({"bootstrap": {"methods": ["layer"]}}, "bootstrap.methods"),
                     ({"bootstrap": {"datasets": ["advbench"]}}, "at least two"),
                     ({"n_orders": 0}, "n_orders")):
        with pytest.raises(config.ConfigError, match=msg):
            config.parse({"overlap": bad})
    with pytest.raises(config.ConfigError, match="not in identify.methods"):
        config.parse({"identify": {"methods": ["snip"]}, "overlap": {"bootstrap": {"methods": ["wanda"]}}})
    with pytest.raises(config.ConfigError, match="identified by snip"):
        config.parse({"calibrate": {}, "identify": {"snip": {"datasets": ["advbench", "harmbench"]}},
                      "overlap": {"bootstrap": {"methods": ["snip"], "datasets": ["advbench", "catqa"]}}})


def test_stage_tables_on_a_shared_core(tmp_path):
    """stages.overlap turns analyze() into the notebook's tables: a shared core gives IoU far above chance, the
    refinement identity holds, empty regions give null metrics, and the verdict states the numbers."""
    from saferegions.stages import overlap as S
    core = rand_region(100, 0.1)
    raw = {f"d{k}": R.union(core, rand_region(k, 0.02)) for k in range(3)}
    util = rand_region(50, 0.05)
    refined = {d: R.difference(r, util) for d, r in raw.items()}
    empty = {d: R.Region({n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}, {}) for d in raw}
    results = {("m", "snip"): O.analyze(raw, refined, util, ["raw", "refined"], ["global"], 2, 0, 100),
               ("m", "layer"): O.analyze(empty, empty, util, ["raw", "refined"], ["global"], 2, 0, 100)}
    summary = S.summary(results, tmp_path)
    snip = summary[(summary.method == "snip") & (summary.variant == "raw")].iloc[0]
    assert snip.mean_iou > 5 * snip.chance_iou and snip.datasets == 3
    assert (tmp_path / "m-snip-raw-global.csv").exists()
    metrics = S.metrics(summary)
    assert metrics["m"]["layer"]["raw"]["mean_iou"] is None
    assert metrics["m"]["snip"]["raw"]["mean_iou"] == pytest.approx(snip.mean_iou)
    ref = S.refinement(results)
    assert ref[ref.method == "snip"]["refined = raw \\ U"].all()
    plateau = S.plateau(S.convergence(results))
    assert set(plateau.k_max) == {3}
    text = S.verdict(summary, plateau, pd.DataFrame(), ref, ["raw", "refined"])
    assert "For 1 of 1 model × method combinations" in text and f"{snip.mean_iou:.3f}" in text
    assert "undefined: the regions are empty" in text and "RQ2" in text


def test_stage_aggregates_average_over_dataset_pairs():
    from saferegions.stages import overlap as stage

    rows = pd.DataFrame({"model": "m", "method": "snip", "refined = raw \\ U": True, "raw_iou": [0.2, 0.4],
                         "refined_iou": [0.1, 0.0], "identity_iou": [0.1, 0.0], "u_frac_of_inter": [0.5, 1.0],
                         "u_frac_of_union": [0.3, 0.2]})
    means = stage.refinement_means(rows)
    assert means.loc[("m", "snip", True), "raw_iou"] == pytest.approx(0.3)
    drop = stage.refinement_drop(rows).set_index("variant")["IoU"]
    assert drop["raw_iou"] == pytest.approx(0.3) and drop["refined_iou"] == pytest.approx(0.05)
    cross = pd.DataFrame({"model": "m", "variant": "raw", "method_a": "a", "method_b": "b", "iou": [0.1, 0.3],
                          "chance": [0.01, 0.03]})
    assert stage.cross_method_means(cross).loc[("m", "a", "b"), ("iou", "raw")] == pytest.approx(0.2)


def test_overlap_metrics_carry_dataset_intervals_refinement_and_split_half(tmp_path):
    """Mean IoU with n = datasets and a dataset-bootstrap CI, refined − raw in raw and chance-corrected form,
    the per-method low-overlap parts, and the split-half IoU of <dataset>.half0/.half1.raw where identify wrote
    them (null where not); the record in `results` reads it back."""
    from saferegions import results as RS
    from saferegions.stages import overlap as S
    core = rand_region(100, 0.1)
    raw = {f"d{k}": R.union(core, rand_region(k, 0.02)) for k in range(4)}
    util = rand_region(50, 0.05)
    refined = {d: R.difference(r, util) for d, r in raw.items()}
    results = {("m", "snip"): O.analyze(raw, refined, util, ["raw", "refined"], ["global"], 2, 0, 100)}
    est = S.dataset_estimates(results)
    folder = tmp_path / "m" / "snip"
    folder.mkdir(parents=True)
    R.save(raw["d0"], R.region_path(folder, "d0", "half0.raw"))
    R.save(raw["d1"], R.region_path(folder, "d0", "half1.raw"))
    R.save(raw["d2"], R.region_path(folder, "d3", "half0.raw"))
    R.save(raw["d3"], R.region_path(folder, "d3", "half1.raw"))
    R.save(raw["d2"], R.region_path(folder, "d5", "half0.raw"))   # no half1: not a split half
    halves = S.split_half(tmp_path, results)
    between = np.mean([O.iou(raw[x], raw[y]) for x in ("d0", "d1") for y in ("d2", "d3")])
    assert halves == {("m", "snip"): {"within": {"d0": pytest.approx(O.iou(raw["d0"], raw["d1"])),
                                                 "d3": pytest.approx(O.iou(raw["d2"], raw["d3"]))},
                                      "between": {"d0|d3": pytest.approx(between)}}}
    full = S.metrics(S.summary(results, tmp_path), est, halves)
    m = full["m"]["snip"]
    a = results["m", "snip"]
    off = O.off_diagonal(a["matrix"]["raw", "global"])
    assert m["raw"]["n_pairs"] == 6 and m["raw"]["n_datasets"] == 4 and m["raw"]["mean_iou"] == pytest.approx(off.mean())
    lo, hi = m["raw"]["mean_iou_ci"]
    assert off.min() - 1e-12 <= lo <= off.mean() <= hi <= off.max() + 1e-12 and m["raw"]["iou"]["ci"] == [lo, hi]
    assert m["raw"]["iou"]["null"] == S.LOW_OVERLAP
    diff = [r["refined_iou"] - r["raw_iou"] for r in a["refinement"]]
    assert m["refined_minus_raw"]["n"] == 4 and m["refined_minus_raw"]["effect"] == pytest.approx(np.mean(diff))
    assert m["refined_minus_raw"]["test"] == "dataset bootstrap (percentile)"
    corr = lambda v: [(x - c) / (1 - c) for x, c in zip(O.off_diagonal(a["matrix"][v, "global"]),  # noqa: E731
                                                        O.off_diagonal(a["chance"][v, "global"]))]
    assert m["raw"]["corrected"]["effect"] == pytest.approx(np.mean(corr("raw")))
    assert m["refined_minus_raw_corrected"]["effect"] == pytest.approx(np.mean(corr("refined")) - np.mean(corr("raw")))
    record = RS.OverlapMetrics.parse(json.loads(json.dumps(full)))
    assert record.to_dict() == json.loads(json.dumps(full))
    got = record.models["m"]["snip"].raw.estimate()
    assert (got.n, got.effect, got.ci) == (4, m["raw"]["mean_iou"], (lo, hi))
    assert m["split_half_iou"] == pytest.approx(np.mean(list(halves["m", "snip"]["within"].values())))
    assert m["between_half_iou"] == pytest.approx(between) and m["between_half"] == {"d0|d3": pytest.approx(between)}
    json.dumps(m, allow_nan=False)
    assert S.split_half(tmp_path / "none", results) == {("m", "snip"): {"within": {}, "between": {}}}
    empty = S.metrics(S.summary(results, tmp_path), est, {})["m"]["snip"]
    assert empty["split_half_iou"] is None and empty["between_half_iou"] is None
    table = S.noise_ceiling(full)
    assert set(table.measure) == {"between datasets", "split-half (same dataset)",
                                  "between datasets, half-size regions"}
    assert S.error_bars(table, "t").axes


def _brute_pair_mean(m, draws):
    """The dataset-bootstrap statistic written out: mean of m over the pairs of positions p < q of a resample
    whose datasets differ; None where there is none."""
    vals = [m[draws[p], draws[q]] for p, q in itertools.combinations(range(len(draws)), 2) if draws[p] != draws[q]]
    return float(np.mean(vals)) if vals else None


def test_dataset_bootstrap_against_every_resample_of_a_planted_matrix():
    """5 datasets, 5^5 equally likely resamples enumerated: the vectorized statistic equals the brute-force one
    on each, the Monte-Carlo interval sits at the exact bootstrap quantiles, a seed gives one result, and no
    pair of a dataset with itself enters (its IoU 1 would pull the mean up)."""
    from saferegions import dataset_bootstrap as B
    rng = np.random.default_rng(3)
    m = rng.uniform(0.05, 0.6, (5, 5))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    every = np.array(list(itertools.product(range(5), repeat=5)))
    fast = B.pair_mean(m, every)
    brute = [_brute_pair_mean(m, t) for t in every]
    assert [x is None for x in brute] == list(np.isnan(fast)) and sum(x is None for x in brute) == 5
    defined = np.array([x for x in brute if x is not None])
    assert np.allclose(fast[~np.isnan(fast)], defined)
    est = B.estimate(m, seed=7, n_resamples=20000)
    lo, hi = est["ci"]
    assert 0.015 <= (defined <= lo).mean() and (defined < lo).mean() <= 0.035
    assert 0.965 <= (defined <= hi).mean() and (defined < hi).mean() <= 0.985
    assert est["n"] == 5 and est["effect"] == pytest.approx(O.off_diagonal(m).mean())
    assert B.estimate(m, seed=7) == B.estimate(m, seed=7)
    assert 0 < est["p"] < 0.01 and B.estimate(m, 7, null=est["effect"])["p"] > 0.5
    flat = np.full((5, 5), 0.3)
    np.fill_diagonal(flat, 1.0)
    assert B.estimate(flat)["ci"] == pytest.approx([0.3, 0.3])      # self-pairs never enter
    two = B.estimate(m[:2, :2])
    assert two["ci"] is None and two["p"] is None and "needs at least 3 datasets" in two["reason"]
    assert two["effect"] == m[0, 1] and two["n"] == 2
    gone = m.copy()
    gone[4, :4] = gone[:4, 4] = np.nan                              # dataset 4's region is empty
    assert B.estimate(gone)["n"] == 4 and B.estimate(gone)["effect"] == pytest.approx(O.off_diagonal(m[:4, :4]).mean())
    assert B.estimate(np.full((3, 3), np.nan))["reason"].startswith("undefined")


def test_dataset_bootstrap_is_wider_than_resampling_pairs_when_datasets_differ():
    """Planted dataset effects (IoU_ij = 0.2 + a_i + a_j): the pairs share datasets, so resampling the 45 pairs
    as independent draws understates the spread the dataset bootstrap sees."""
    from saferegions import dataset_bootstrap as B, evidence
    a = np.random.default_rng(0).uniform(0, 0.2, 10)
    m = 0.2 + a[:, None] + a[None, :]
    np.fill_diagonal(m, 1.0)
    by_dataset, by_pair = B.estimate(m)["ci"], evidence.mean(O.off_diagonal(m)).ci
    assert by_dataset[1] - by_dataset[0] > 1.5 * (by_pair[1] - by_pair[0])


def test_chance_correction_against_random_masks():
    """The chance of analyze() is the mean IoU of random regions with the planted regions' per-matrix sizes
    (raw: anywhere; refined: outside U), so their chance-corrected IoU averages 0 (Monte-Carlo, 300 draws),
    while the global-density formula f / (2 − f) misses it where the sizes differ by matrix."""
    from saferegions import dataset_bootstrap as B
    shapes = {"model.layers.0.mlp.up_proj.weight": (60, 100), "model.layers.1.mlp.up_proj.weight": (60, 100)}
    dense = lambda k, f0, f1: R.Region({n: torch.rand(s, generator=torch.Generator().manual_seed(k + i))  # noqa: E731
                                        < (f0, f1)[i] for i, (n, s) in enumerate(shapes.items())}, {})
    raw = {"a": dense(0, 0.4, 0.02), "b": dense(10, 0.3, 0.05), "c": dense(20, 0.35, 0.01)}
    util = dense(30, 0.3, 0.3)
    refined = {d: R.difference(r, util) for d, r in raw.items()}
    res = O.analyze(raw, refined, util, ["raw", "refined"], ["global"], n_orders=1, seed=0, draws=10)
    g = torch.Generator().manual_seed(1)

    def draw(region, outside):   # the region's per-matrix count at random entries (outside U where given)
        masks = {}
        for n, m in region.masks.items():
            free = torch.nonzero(~outside.masks[n].flatten() if outside else torch.ones(m.numel(), dtype=torch.bool)).flatten()
            pick = free[torch.randperm(free.numel(), generator=g)[:int(m.sum())]]
            masks[n] = torch.zeros(m.numel(), dtype=torch.bool).index_fill_(0, pick, True).view(m.shape)
        return R.Region(masks, {})

    for v, regs, outside in (("raw", raw, None), ("refined", refined, util)):
        chance = res["chance"][v, "global"][0, 1]
        sims = np.array([O.iou(draw(regs["a"], outside), draw(regs["b"], outside)) for _ in range(300)])
        corr = O.corrected(sims, chance)
        assert abs(corr.mean()) < 3 * corr.std() / math.sqrt(len(corr)) + 1e-3, (v, corr.mean())
    f = raw["a"].density, raw["b"].density
    assert abs(O.chance_iou(*f) - res["chance"]["raw", "global"][0, 1]) > 0.05
    observed = res["matrix"]["raw", "global"][0, 1]
    c = res["chance"]["raw", "global"][0, 1]
    assert O.corrected(observed, c) == pytest.approx((observed - c) / (1 - c))
    assert O.corrected(c, c) == 0 and O.corrected(1.0, c) == 1 and math.isnan(O.corrected(0.5, 1.0))
    est = B.analysis_estimates(res, "global", 0, 0.5)
    pairs = lambda v: O.corrected(O.off_diagonal(res["matrix"][v, "global"]),  # noqa: E731
                                  O.off_diagonal(res["chance"][v, "global"]))
    assert est["raw"]["corrected"]["effect"] == pytest.approx(pairs("raw").mean())
    assert est["refined_minus_raw_corrected"]["effect"] == pytest.approx(pairs("refined").mean() - pairs("raw").mean())


def test_no_overlap_interval_is_nan(tmp_path):
    """Methods with 3 datasets, 2 datasets and empty regions: metrics.json is strict JSON, every interval is a
    finite [low, high] or null with a reason, the record reads it back, the notebook's tables and verdict never
    print nan, and a missing interval decides nothing (inconclusive)."""
    from saferegions import evidence, results as RS, tables
    from saferegions.stages import overlap as S
    core = rand_region(100, 0.1)
    util = rand_region(50, 0.05)
    empty = R.Region({n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}, {})
    res = {}
    for method, k in (("wanda", 3), ("snip", 2)):
        raw = {f"d{j}": R.union(core, rand_region(j + 10 * k, 0.02)) for j in range(k)}
        res["m", method] = O.analyze(raw, {d: R.difference(r, util) for d, r in raw.items()}, util,
                                     ["raw", "refined"], ["global"], 2, 0, 100)
    res["m", "layer"] = O.analyze({"d0": empty, "d1": empty, "d2": empty}, {"d0": empty, "d1": empty, "d2": empty},
                                  util, ["raw", "refined"], ["global"], 2, 0, 100)
    summary = S.summary(res, tmp_path)
    metrics = S.metrics(summary, S.dataset_estimates(res), {})
    text = json.dumps(metrics, allow_nan=False)
    assert not re.search(r"\bnan\b", text, re.I)
    estimates = [e for m, k, per in S._methods(metrics) for v, key, _ in S.MEASURES
                 if (e := (per.get(v) or {}).get(key) if v else per.get(key))]
    assert len(estimates) == 18
    for e in estimates:
        assert (e["ci"] is None) == (e["reason"] is not None)
        assert e["ci"] is None or all(math.isfinite(x) for x in e["ci"])
    assert metrics["m"]["wanda"]["raw"]["iou"]["ci"] is not None
    assert metrics["m"]["snip"]["raw"]["iou"]["reason"].startswith("every resample with a pair repeats")
    assert metrics["m"]["layer"]["raw"]["iou"]["reason"].startswith("undefined")
    record = RS.OverlapMetrics.parse(json.loads(text))
    methods = record.models["m"]
    assert list(methods) == ["wanda", "snip", "layer"]
    assert methods["wanda"].raw.iou.ci == metrics["m"]["wanda"]["raw"]["iou"]["ci"]
    assert evidence.verdict(methods["snip"].raw.iou.estimate(), 0.5, "<") == evidence.Verdict.INCONCLUSIVE
    assert methods["layer"].raw.iou.estimate() is None
    drop = methods["wanda"].refined_minus_raw_corrected
    assert drop.effect == metrics["m"]["wanda"]["refined_minus_raw_corrected"]["effect"]
    assert methods["snip"].refined.corrected.reason.startswith("every resample")
    shown = tables.table(S.metrics_table(metrics), index=False).to_html()
    verdict = S.verdict(summary, S.plateau(S.convergence(res)), pd.DataFrame(), S.refinement(res), ["raw", "refined"],
                        metrics)
    assert "needs at least 3 datasets" in shown and "needs at least 3 datasets" in verdict
    assert not re.search(r"\bnan\b", shown, re.I) and not re.search(r"\bnan\b", verdict, re.I)
