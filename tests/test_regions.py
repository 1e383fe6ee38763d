"""Known answers for region selection, set algebra, packing, I/O and IoU (docs/methods.md §2.1, §3, §4.3)."""
import math

import numpy as np
import pytest
import torch

from saferegions import regions as R
from saferegions import topk
from saferegions import overlap as O

SHAPES = {"l0.q": (6, 10), "l0.down": (5, 13), "l1.experts": (3, 4, 9), "l1.bias": (11,)}


def scores(seed, ties=False, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    if ties:
        return {n: torch.randint(0, 4, s, generator=g).float() for n, s in shapes.items()}
    return {n: torch.rand(s, generator=g) for n, s in shapes.items()}


def ref_top(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Full stable sort: ties go to the earliest entries."""
    order = torch.sort(flat, descending=largest, stable=True).indices[:k]
    m = torch.zeros(flat.numel(), dtype=torch.bool)
    m[order] = True
    return m


def ref_select(sc, frac, group, largest):
    if group == "global":
        flat = torch.cat([s.reshape(-1) for s in sc.values()])
        m, out, a = ref_top(flat, int(frac * flat.numel()), largest), {}, 0
        for n, s in sc.items():
            out[n] = m[a:a + s.numel()].view(s.shape)
            a += s.numel()
        return out
    if group == "matrix":
        return {n: ref_top(s.reshape(-1), int(frac * s.numel()), largest).view(s.shape)
                for n, s in sc.items()}
    out = {}
    for n, s in sc.items():
        rows = s.reshape(-1, s.shape[-1])
        kr = int(frac * rows.shape[1])
        out[n] = torch.stack([ref_top(r, kr, largest) for r in rows]).view(s.shape)
    return out


def rand_region(seed, density, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return R.Region({n: torch.rand(s, generator=g) < density for n, s in shapes.items()}, {"seed": seed})


def ref_iou(masks_list, scope, num=None, den=None):
    num = num or (lambda ms: torch.stack(ms).all(0))
    den = den or (lambda ms: torch.stack(ms).any(0))
    per, tn, td = [], 0, 0
    for n in masks_list[0]:
        ms = [m[n] for m in masks_list]
        i, u = int(num(ms).sum()), int(den(ms).sum())
        tn, td = tn + i, td + u
        if u:
            per.append(i / u)
    return tn / td if scope == "global" else sum(per) / len(per)


def same(a: R.Region, b: R.Region):
    assert list(a.masks) == list(b.masks)
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n]), n


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("group", ["matrix", "row", "global"])
def test_counts_exact_with_ties(group):
    sc = {n: torch.ones(s) for n, s in SHAPES.items()}  # all tied: only tie-breaking decides
    sc["l0.q"][0, :3] = 0.5
    for frac in (0.0, 0.1, 0.33, 0.5, 1.0):
        r = R.top_fraction(sc, frac, group)
        if group == "matrix":
            assert all(int(m.sum()) == int(frac * m.numel()) for m in r.masks.values())
        elif group == "row":
            for m in r.masks.values():
                rows = m.reshape(-1, m.shape[-1])
                assert (rows.sum(1) == int(frac * rows.shape[1])).all()
        else:
            assert r.size == int(frac * r.numel)
        assert r.meta["selection"]["group"] == group


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("group", ["matrix", "row", "global"])
def test_selection_equals_full_sort(group, largest, ties):
    for seed in range(4):
        sc = scores(seed, ties)
        for frac in (0.05, 0.2, 0.5):
            same(R.top_fraction(sc, frac, group, largest), R.Region(ref_select(sc, frac, group, largest)))


def test_selection_chunked_passes(monkeypatch):
    """Tiny chunks: histogram passes, ties across chunk borders and row blocks must give the same answer."""
    monkeypatch.setattr(topk, "_CHUNK", 7)
    for seed in range(3):
        for ties in (False, True):
            sc = scores(seed, ties)
            for group in ("matrix", "row", "global"):
                for largest in (True, False):
                    got = R.top_fraction(sc, 0.3, group, largest)
                    same(got, R.Region(ref_select(sc, 0.3, group, largest)))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("largest", [True, False])
def test_sampled_fast_path_equals_full_sort(monkeypatch, ties, largest):
    """Per-matrix selection on large tensors uses a sampled threshold; it must stay exact (ties included), also
    when forced onto small tensors, where the sample is the whole tensor."""
    big = {"w": torch.rand(300, 700, generator=torch.Generator().manual_seed(5))}
    if ties:
        big["w"] = (big["w"] * 50).floor()
    for frac in (0.001, 0.02, 0.2):
        same(R.top_fraction(big, frac, "matrix", largest), R.Region(ref_select(big, frac, "matrix", largest)))
    monkeypatch.setattr(topk, "_FAST_MIN", 1)
    monkeypatch.setattr(topk, "_SAMPLE", 16)
    for seed in range(3):
        sc = scores(seed, ties)
        for frac in (0.05, 0.2):
            same(R.top_fraction(sc, frac, "matrix", largest), R.Region(ref_select(sc, frac, "matrix", largest)))


def test_largest_false_picks_smallest():
    sc = {"w": torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.3, 0.7, 0.2, 0.8]])}
    small = R.top_fraction(sc, 0.25, "matrix", largest=False).masks["w"]
    assert small.nonzero().tolist() == [[0, 1], [0, 3]]
    big = R.top_fraction(sc, 0.25, "matrix").masks["w"]
    assert big.nonzero().tolist() == [[0, 0], [1, 3]]
    assert R.top_fraction(sc, 0.5, "row", largest=False).masks["w"].tolist() == [
        [False, True, False, True], [True, False, True, False]]


def test_top_k_global_exact_and_edges():
    sc = scores(7, ties=True)
    total = sum(s.numel() for s in sc.values())
    for k in (0, 1, 17, total - 1, total):
        r = R.top_k_global(sc, k, meta={"method": "esi"})
        assert r.size == k and r.meta["method"] == "esi" and r.meta["selection"]["k"] == k
    with pytest.raises(ValueError):
        R.top_k_global(sc, total + 1)
    with pytest.raises(ValueError):
        R.top_k_global({"w": torch.tensor([1.0, math.nan])}, 1)
    with pytest.raises(ValueError):
        R.top_fraction(sc, 0.1, group="layer")


def test_random_like_counts_seeded_and_complement():
    base = rand_region(0, 0.3)
    dense = rand_region(1, 0.8)
    for reg in (base, dense):
        m = R.random_like(reg, seed=5)
        counts = lambda r: {n: int(x.sum()) for n, x in r.masks.items()}  # noqa: E731
        assert counts(m) == counts(reg)
        gl = R.random_like(reg, seed=5, mode="global_uniform")
        assert gl.size == reg.size and gl.meta["mode"] == "global_uniform"
    same(R.random_like(base, 3), R.random_like(base, 3))
    assert not torch.equal(R.random_like(base, 3).masks["l0.q"], R.random_like(base, 4).masks["l0.q"])
    with pytest.raises(ValueError):
        R.random_like(base, 0, mode="faithful")


@pytest.mark.parametrize("mode", ["per_matrix_matched", "global_uniform"])
def test_random_iou_matches_chance(mode):
    f = 0.05
    shapes = {"a": (200, 500), "b": (400, 250)}  # 200k entries
    ref = R.top_fraction(scores(0, shapes=shapes), f)
    draws = [R.random_like(ref, seed=s, mode=mode) for s in range(8)]
    ious = [O.iou(draws[i], draws[i + 1]) for i in range(0, 8, 2)]
    assert abs(np.mean(ious) / O.chance_iou(f) - 1) < 0.10
    assert O.chance_iou(f) == pytest.approx(f / (2 - f))


def test_chance_formulas():
    for f, want in [(0.01, 0.0050), (0.02, 0.0101), (0.03, 0.0152), (0.05, 0.0256), (0.10, 0.0526)]:
        assert round(O.chance_iou(f), 4) == want
        assert O.chance_multiway(f, 2) == pytest.approx(O.chance_iou(f))
    assert O.chance_iou(0.1, 0.2) == pytest.approx(0.02 / 0.28)
    assert O.chance_multiway(0.5, 3) == pytest.approx(0.125 / 0.875)
    assert O.chance_iou(0.0) == 0.0 and O.chance_multiway(0.0, 4) == 0.0


# ---------------------------------------------------------------- set algebra


def test_set_algebra_hand_made():
    t = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    a = R.Region({"w": t(1, 1, 0, 0), "v": t(1, 0)}, {"name": "a"})
    b = R.Region({"w": t(0, 1, 1, 0), "v": t(1, 1)}, {"name": "b"})
    c = R.Region({"w": t(0, 1, 0, 1), "v": t(0, 1)})
    assert R.difference(a, b).masks["w"].tolist() == [True, False, False, False]
    assert R.difference(a, b).masks["v"].tolist() == [False, False]
    assert R.intersection(a, b).masks["w"].tolist() == [False, True, False, False]
    assert R.union(a, b).masks["w"].tolist() == [True, True, True, False]
    assert R.intersect_all([a, b, c]).masks["w"].tolist() == [False, True, False, False]
    assert R.union_all([a, b, c]).masks["v"].tolist() == [True, True]
    assert R.difference(a, b).meta == {"op": "difference", "operands": [{"name": "a"}, {"name": "b"}]}
    assert (a.size, a.numel, a.density) == (3, 6, 0.5)
    assert a.per_tensor_density() == {"w": 0.5, "v": 0.5}


def test_refine_hand_made():
    safety = {"w": torch.tensor([[9.0, 8.0, 7.0], [1.0, 0.0, 6.0]])}
    utility = {"w": torch.tensor([[5.0, 0.0, 4.0], [0.0, 0.0, 0.0]])}
    # Top_q(safety), q=0.5 -> {9, 8, 7}; Top_p(utility), p=1/3 -> {5, 4}; difference keeps 8 only.
    r = R.refine(safety, utility, q=0.5, p=1 / 3)
    assert r.masks["w"].tolist() == [[False, True, False], [False, False, False]]
    assert r.meta["refinement"]["p"] == pytest.approx(1 / 3) and r.meta["selection"]["frac"] == 0.5


def test_mismatch_raises():
    a = rand_region(0, 0.3)
    missing = R.Region({n: m for n, m in a.masks.items() if n != "l0.q"})
    reshaped = R.Region({**a.masks, "l0.q": a.masks["l0.q"].reshape(10, 6)})
    for bad in (missing, reshaped):
        for fn in (R.difference, R.intersection, R.union, O.iou, O.intersection_size):
            with pytest.raises(ValueError):
                fn(a, bad)
        with pytest.raises(ValueError):
            O.multiway_iou([a, a, bad.packed()])
    with pytest.raises(ValueError):
        R.Region({"w": torch.zeros(3)})
    with pytest.raises(ValueError):
        O.iou(a, a, scope="layer")


# ---------------------------------------------------------------- packing and I/O


ODD = {"a": (3, 5), "b": (64,), "c": (7, 9, 3), "empty": (0, 4)}


@pytest.mark.parametrize("density", [0.01, 0.5])
def test_pack_round_trip(density):
    g = torch.Generator().manual_seed(1)
    reg = R.Region({n: torch.rand(s, generator=g) < density for n, s in ODD.items()}, {"m": 1})
    reg.masks["c"].view(-1)[:3] = True  # also a run of bits inside one byte
    for enc in ("bits", "idx", "auto"):
        p = R.pack(reg, enc)
        if enc != "auto":
            assert all(p.encoding(n) == enc for n in ODD)
        assert p.size == reg.size and p.numel == reg.numel
        same(R.unpack(p), reg)
        for enc2 in ("bits", "idx", "auto"):  # re-encoding packed regions, no bool detour
            same(R.pack(p, enc2).unpack(), reg)
    with pytest.raises(ValueError):
        R.PackedRegion({"w": np.array([3, 1], np.int32)}, {"w": (4,)})
    auto = reg.packed()
    for n, d in reg.per_tensor_density().items():
        assert auto.encoding(n) == ("idx" if d <= 0.03 else "bits")


def test_save_load_round_trip(tmp_path):
    reg = rand_region(3, 0.02)
    reg.masks["l0.q"].fill_(True)  # dense tensor -> bits
    reg.masks["l0.down"].zero_()[0, 0] = True  # 1/65 <= 3% -> idx
    reg.meta = {"method": "snip", "model": "tiny", "params": {"q": 0.02}}
    reg.units = {"layers": [0, 1]}
    path = tmp_path / "sub" / "region.safetensors"
    R.save(reg, path)
    assert [p.name for p in path.parent.iterdir()] == ["region.safetensors"]  # no temp left behind
    back = R.load(path)
    same(back, reg)
    assert back.meta == reg.meta and back.units == reg.units
    packed = R.load_packed(path)
    assert packed.encoding("l0.q") == "bits" and packed.encoding("l0.down") == "idx"
    assert packed.data["l0.down"].dtype == np.int32 and packed.shapes["l1.experts"] == (3, 4, 9)
    assert O.iou(packed, reg) == 1.0
    R.save(reg, path, encoding="bits")
    assert R.load_packed(path).encoding("l0.down") == "bits"
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.uint8)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError):
        R.load_packed(tmp_path / "other.safetensors")


# ---------------------------------------------------------------- overlap


@pytest.mark.parametrize("scope", ["global", "per_matrix"])
def test_iou_matches_bool_reference(scope, monkeypatch):
    shapes = {"a": (40, 33), "b": (128,), "c": (5, 7), "zero": (3, 3)}
    for seed in range(3):
        a, b = rand_region(seed, 0.3, shapes), rand_region(seed + 10, 0.05, shapes)
        a.masks["zero"].zero_()
        b.masks["zero"].zero_()  # empty union: skipped by per_matrix
        want = ref_iou([a.masks, b.masks], scope)
        for x, y in [(a, b), (a.packed("bits"), b.packed("idx")), (a.packed("idx"), b)]:
            assert O.iou(x, y, scope) == pytest.approx(want, abs=1e-12)
        inter = sum(int((a.masks[n] & b.masks[n]).sum()) for n in shapes)
        uni = sum(int((a.masks[n] | b.masks[n]).sum()) for n in shapes)
        assert (O.intersection_size(a.packed(), b), O.union_size(a, b.packed())) == (inter, uni)
    empty = R.Region({"w": torch.zeros(5, dtype=torch.bool)})
    assert math.isnan(O.iou(empty, empty)) and math.isnan(O.iou(empty, empty, "per_matrix"))


@pytest.mark.parametrize("scope", ["global", "per_matrix"])
def test_multiway_matches_reference(scope):
    regs = [rand_region(s, 0.6) for s in range(5)]
    for k in (2, 3, 5):
        want = ref_iou([r.masks for r in regs[:k]], scope)
        assert O.multiway_iou(regs[:k], scope) == pytest.approx(want)
        assert O.multiway_iou([r.packed() for r in regs[:k]], scope) == pytest.approx(want)
        assert O.multiway_iou(regs[:k], scope) == pytest.approx(
            ref_iou([R.intersect_all(regs[:k]).masks, R.union_all(regs[:k]).masks], scope))
    assert O.multiway_iou(regs[:2], scope) == pytest.approx(O.iou(regs[0], regs[1], scope))


@pytest.mark.parametrize("scope", ["global", "per_matrix"])
def test_refined_iou_identity(scope):
    for seed in range(3):
        a, b, u = rand_region(seed, 0.4), rand_region(seed + 5, 0.4), rand_region(seed + 9, 0.3)
        want = O.iou(R.difference(a, u), R.difference(b, u), scope)
        assert O.refined_iou(a, b, u, scope) == pytest.approx(want)
        got = O.refined_iou(a.packed("bits"), b.packed("idx"), u.packed("bits"), scope)
        assert got == pytest.approx(want)


@pytest.mark.parametrize("largest", [True, False])
def test_sampled_global_topk_equals_full_select(largest):
    """top_k_global's sampled fast path picks exactly the entries the radix select picks, ties included."""
    torch.manual_seed(0)
    scores = {"a": torch.rand(700, 900), "b": torch.rand(1300, 500).round(decimals=2), "c": torch.zeros(50000)}
    scores["b"][:100] = 0.99                      # many exact ties at the top
    k = 30000
    fast = topk.select_sampled(scores, k, largest)
    full = topk.select(scores, k, largest)
    assert fast is not None and all(torch.equal(fast[n], full[n]) for n in scores)
    assert sum(int(m.sum()) for m in fast.values()) == k
    region = R.top_k_global(scores, k, largest)
    assert all(torch.equal(region.masks[n], full[n]) for n in scores)
