"""The validation's controls: the positive control on a planted refusal direction, the importance-matched random
region against a planted score distribution, and the power calculation against a brute-force simulation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from saferegions import evidence, power
from saferegions.importance_matched import importance_matched
from saferegions.methods import refusal_direction as rd
from saferegions.regions import Region, random_like
from saferegions.tiny import tiny_model

# ---------------------------------------------------------------- positive control: a planted refusal direction


def _single_tokens(tok, n: int) -> list[int]:
    """Token ids that decode to text which encodes back to that one id (so a text ends in a known token)."""
    out = []
    for i in range(len(tok)):
        text = tok.decode([i])
        if text.strip() and tok(text, add_special_tokens=False)["input_ids"] == [i] and not text.startswith("<"):
            out.append(i)
        if len(out) == n:
            return out
    raise AssertionError("too few round-tripping tokens")


def _planted(alpha: float = 4.0, pairs: int = 6, seed: int = 0):
    """A tiny model whose "harmful" tokens embed as their "harmless" partner plus alpha·r̂ (r̂ a random unit
    vector): texts that differ only in that final token differ in the residual stream exactly along r̂ at the first
    block's input. Returns (model, tok, r̂, harmful texts, harmless texts)."""
    model, tok = tiny_model("llama", layers=2, hidden=64)
    ids = _single_tokens(tok, 2 * pairs + 2)
    harm, harmless, prefix = ids[:pairs], ids[pairs:2 * pairs], ids[2 * pairs:]
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(64, generator=g)
    r /= r.norm()
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[harm] = emb[harmless] + alpha * r
    texts = lambda last: [tok.decode(prefix[j % len(prefix):] + [t]) for j, t in enumerate(last)]  # noqa: E731
    return model, tok, r, texts(harm), texts(harmless)


def _last_logits(model, tok, texts):
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids).logits[0, -1])
    return torch.stack(out)


def test_refusal_direction_recovers_the_planted_direction_and_ablation_removes_it():
    model, tok, r, harm, harmless = _planted()
    diffs = (rd.mean_activations(model, tok, harm, [-1], batch_size=4)
             - rd.mean_activations(model, tok, harmless, [-1], batch_size=4))
    assert diffs.shape == (1, 2, 64)
    d0 = diffs[0, 0].float()
    assert torch.nn.functional.cosine_similarity(d0, r, dim=0) > 0.999   # the planted direction, recovered
    assert d0.norm() == pytest.approx(4.0, rel=1e-3)
    before_h, before_n = _last_logits(model, tok, harm), _last_logits(model, tok, harmless)
    assert (before_h - before_n).abs().max() > 1e-3                      # the planted direction changes the output
    with rd.ablated(model, d0):
        after_h, after_n = _last_logits(model, tok, harm), _last_logits(model, tok, harmless)
    torch.testing.assert_close(after_h, after_n, rtol=1e-4, atol=1e-5)   # ablated: the difference is gone
    other = torch.randn(64, generator=torch.Generator().manual_seed(1))
    with rd.ablated(model, other):                                       # an unrelated direction does not remove it
        assert (_last_logits(model, tok, harm) - _last_logits(model, tok, harmless)).abs().max() > 1e-3
    torch.testing.assert_close(_last_logits(model, tok, harm), before_h)  # hooks gone on exit


def test_selection_picks_the_candidate_whose_ablation_removes_the_planted_difference():
    model, tok, _, harm, harmless = _planted()
    diffs = (rd.mean_activations(model, tok, harm, [-1]) - rd.mean_activations(model, tok, harmless, [-1]))
    pairs = rd.candidates(2, [0.0, 0.9], [-1])
    assert pairs == [(0, -1), (1, -1)]

    def same_as_harmless():
        gap = (_last_logits(model, tok, harm) - _last_logits(model, tok, harmless)).abs().amax(-1)
        return float((gap < 1e-4).float().mean())
    layer, pos, direction, rates = rd.select(model, diffs, [-1], pairs, same_as_harmless)
    assert (layer, pos) == (0, -1) and rates == {"0/-1": 1.0, "1/-1": 0.0}
    torch.testing.assert_close(direction, diffs[0, 0])


def test_ablation_refuses_a_zero_direction():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="non-zero"):
        with rd.ablated(model, torch.zeros(64)):
            pass


# ---------------------------------------------------------------- importance-matched random region


def _planted_region(seed: int = 0):
    """Scores uniform in [0, 1); the region takes 600 entries of matrix "a" skewed to high scores (score^0.3 law)
    and 100 of matrix "b" uniformly."""
    g = torch.Generator().manual_seed(seed)
    scores = {"a": torch.rand(200, 150, generator=g), "b": torch.rand(50, 80, generator=g)}
    masks = {}
    for name, c in (("a", 600), ("b", 100)):
        s = scores[name].reshape(-1)
        weight = s ** 8 if name == "a" else torch.ones_like(s)
        idx = torch.multinomial(weight, c, replacement=False, generator=g)
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[idx] = True
        masks[name] = m.view(scores[name].shape)
    return Region(masks, {"method": "planted"}), scores


def test_importance_matched_keeps_counts_and_the_score_distribution_a_uniform_draw_does_not():
    region, scores = _planted_region()
    matched = importance_matched(region, scores, seed=3, bins=20)
    uniform = random_like(region, seed=3)
    a_region = scores["a"][region.masks["a"]].numpy()
    for name in region.masks:
        assert int(matched.masks[name].sum()) == int(region.masks[name].sum())    # per-matrix counts, exactly
        assert not (matched.masks[name] & region.masks[name]).any()               # disjoint from the region
    assert stats.ks_2samp(a_region, scores["a"][matched.masks["a"]].numpy()).pvalue > 0.05
    assert stats.ks_2samp(a_region, scores["a"][uniform.masks["a"]].numpy()).pvalue < 1e-6
    # per bin, exactly the region's count
    b = torch.bucketize(scores["a"].reshape(-1), torch.quantile(scores["a"].reshape(-1), torch.linspace(0, 1, 21)[1:-1]),
                        right=True)
    assert torch.equal(torch.bincount(b[matched.masks["a"].reshape(-1)], minlength=20),
                       torch.bincount(b[region.masks["a"].reshape(-1)], minlength=20))


def test_importance_matched_is_seeded_and_refuses_an_unmatchable_bin():
    region, scores = _planted_region()
    one, two = importance_matched(region, scores, 1), importance_matched(region, scores, 1)
    assert all(torch.equal(one.masks[n], two.masks[n]) for n in region.masks)
    full = Region({"a": torch.ones(10, 10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bin"):
        importance_matched(full, {"a": torch.rand(10, 10)}, 0, bins=2)


# ---------------------------------------------------------------- power


def test_mcnemar_power_matches_a_brute_force_simulation_of_the_exact_test():
    """Prompt-level paired outcomes simulated, each run's discordant pairs judged by scipy's exact binomial test
    (the McNemar p of evidence.paired_proportions), the rejection rate compared with the computed power."""
    n, effect, disc, reps = 60, 0.15, 0.3, 2000
    p10, p01 = (disc + effect) / 2, (disc - effect) / 2
    u = np.random.default_rng(0).random((reps, n))
    only_a, only_b = (u < p10).sum(1), ((u >= p10) & (u < p10 + p01)).sum(1)
    pairs, counts = np.unique(np.stack([only_a, only_b], 1), axis=0, return_counts=True)
    rejected = sum(c for (k, j), c in zip(pairs, counts) if k + j and stats.binomtest(int(k), int(k + j)).pvalue <= 0.05)
    sim = rejected / reps
    assert power.mcnemar_power(n, effect, disc) == pytest.approx(sim, abs=3.5 * np.sqrt(0.25 / reps))
    a = np.array([True] * 7 + [False] * 2 + [True] * 5 + [False] * 6)   # the same p as the stage's paired test
    b = np.array([False] * 7 + [True] * 2 + [True] * 5 + [False] * 6)
    assert evidence._paired(a, b).p == pytest.approx(stats.binomtest(7, 9, 0.5).pvalue)


def test_n_for_power_is_the_first_n_that_reaches_the_power_and_mde_inverts_it():
    n = power.n_for_power(0.10, 0.20)
    assert power.mcnemar_power(n, 0.10, 0.20) >= 0.8 > power.mcnemar_power(n - 1, 0.10, 0.20)
    assert all(power.mcnemar_power(k, 0.10, 0.20) < 0.8 for k in range(n - 20, n))
    mde = power.minimal_detectable_effect(800, 0.20)
    assert power.mcnemar_power(800, mde, 0.20) == pytest.approx(0.8, abs=2e-3)
    assert mde < power.minimal_detectable_effect(200, 0.20)
    plan = power.plan(0.10, 0.20, n=170)
    assert plan.n_required == n and plan.n == 170 and plan.mde < 0.10
    with pytest.raises(ValueError, match="discordance"):
        power.mcnemar_power(100, 0.3, 0.2)
