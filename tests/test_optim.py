"""MaskedAdamW: frozen entries never move, faithful == sparse on trainable entries, AdamW equivalence,
sparse memory, and SET / SPA parameter selection."""
import math

import pytest
import torch

from saferegions.optim import MaskedAdamW, build_param_groups, invert_masks, is_bias_or_norm, state_bytes
from saferegions.tiny import tiny_model

MODES = ["faithful", "sparse"]


def _params(seed=0, dtypes=(torch.float32, torch.float32, torch.bfloat16)):
    """A few params with random masks: 5% and 30% density, an all-False one, a bf16 one, one unmasked."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 48), (64,), (16, 16), (24, 40)]
    fracs = [0.05, 0.3, 0.0, 0.1]
    pairs = []
    for i, (shape, f) in enumerate(zip(shapes, fracs)):
        dtype = dtypes[i] if i < len(dtypes) else torch.float32
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        pairs.append((p, torch.rand(shape, generator=g) < f))
    pairs.append((torch.nn.Parameter(torch.randn(8, 8, generator=g)), None))
    return pairs


def _clone(pairs):
    return [(torch.nn.Parameter(p.detach().clone()), None if m is None else m.clone()) for p, m in pairs]


def _run(pairs, mode, steps, seed=1, **kw):
    opt = MaskedAdamW(pairs, lr=1e-2, mode=mode, **kw)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, _ in pairs:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)  # nonzero outside the mask too
        opt.step()
    return opt


@pytest.mark.parametrize("mode", MODES)
def test_frozen_entries_bit_identical(mode):
    pairs = _params()
    before = [p.detach().clone() for p, _ in pairs]
    _run(pairs, mode, steps=50)
    for (p, m), b in zip(pairs, before):
        assert p.dtype == b.dtype
        if m is None:
            assert not torch.equal(p, b)
            continue
        assert torch.equal(p[~m], b[~m])
        if m.any():
            assert (p[m] != b[m]).all()


def test_faithful_and_sparse_agree_on_trainable_entries():
    # Gradients are nonzero outside the mask: faithful moments see them, but moments are element-wise.
    pairs_f = _params(dtypes=(torch.float32,) * 4)
    pairs_s = _clone(pairs_f)
    opt_f = _run(pairs_f, "faithful", steps=20)
    opt_s = _run(pairs_s, "sparse", steps=20)
    for (pf, m), (ps, _) in zip(pairs_f, pairs_s):
        torch.testing.assert_close(ps, pf, rtol=1e-5, atol=1e-7)
        if m is not None and "idx" in opt_s.state[ps] and m.any():
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_s.state[ps][k], opt_f.state[pf][k][m].reshape(-1))


def test_bf16_params_keep_fp32_moments():
    pairs = _params()
    for mode in MODES:
        opt = _run(_clone(pairs), mode, steps=3)
        for s in opt.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in s:
                    assert s[k].dtype == torch.float32


def _adamw_ref(theta, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    """Hand-written reference optimizer (SafeWeights-ACL optimizers.py, all-ones mask), float64."""
    theta, m, v = theta.double().clone(), torch.zeros_like(theta, dtype=torch.float64), None
    v = torch.zeros_like(m)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
        theta = theta - lr / (1 - b1**t) * (m / denom + wd * theta)  # decay inside the bias-corrected step
    return theta


def test_all_true_mask_matches_torch_adamw_and_reference():
    torch.manual_seed(0)
    theta0 = torch.randn(40, 30)
    grads = [torch.randn(40, 30) for _ in range(20)]
    ones = torch.ones(40, 30, dtype=torch.bool)

    def run(make_opt):
        p = torch.nn.Parameter(theta0.clone())
        opt = make_opt(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    torch_adamw = run(lambda p: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01))
    for mode in MODES:
        ours = run(lambda p: MaskedAdamW([(p, ones)], lr=1e-2, mode=mode, ref_decay=False))
        torch.testing.assert_close(ours, torch_adamw, rtol=1e-5, atol=1e-6)
        ref = run(lambda p: MaskedAdamW([(p, ones)], lr=1e-2, mode=mode))
        torch.testing.assert_close(ref.double(), _adamw_ref(theta0, grads, 1e-2), rtol=1e-5, atol=1e-6)
    # the reference's decay (lr / bias_correction1) is measurably different from torch's at lr 1e-2
    assert not torch.allclose(ref, torch_adamw, rtol=1e-6, atol=0)


@pytest.mark.parametrize("index_dtype,idx_bytes", [(torch.int64, 8), (torch.int32, 4)])
def test_sparse_state_bytes(index_dtype, idx_bytes):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256, 1024))
    mask = torch.rand(p.shape) < 0.01
    k = int(mask.sum())
    p.grad = torch.randn(p.shape)
    sparse = MaskedAdamW([(p, mask)], mode="sparse", index_dtype=index_dtype)
    sparse.step()
    dense = MaskedAdamW([(p, mask)], mode="faithful")
    dense.step()
    assert state_bytes(sparse) == 2 * 4 * k + idx_bytes * k
    assert state_bytes(dense) == 2 * 4 * p.numel()
    assert state_bytes(sparse) < 0.03 * state_bytes(dense)


def test_sparse_falls_back_to_dense_for_dense_masks():
    # SPA masks are ~99% True: an index would cost more than the moments it saves.
    p = torch.nn.Parameter(torch.randn(64, 64))
    mask = torch.rand(p.shape) < 0.99
    before = p.detach().clone()
    p.grad = torch.randn(p.shape)
    opt = MaskedAdamW([(p, mask)], mode="sparse")
    opt.step()
    assert "idx" not in opt.state[p] and state_bytes(opt) == 2 * 4 * p.numel()
    assert torch.equal(p[~mask], before[~mask])


def test_state_dict_roundtrip_keeps_fp32_moments():
    for mode in MODES:
        pairs = _params()  # includes a bf16 param: torch's loader would cast its moments to bf16
        opt = _run(pairs, mode, steps=2)
        opt2 = MaskedAdamW(pairs, lr=1e-2, mode=mode)
        opt2.load_state_dict(opt.state_dict())
        for p, _ in pairs:
            for k, v in opt.state[p].items():
                w = opt2.state[p][k]
                assert (w == v) if not torch.is_tensor(v) else (w.dtype == v.dtype and torch.equal(w, v))


def _region(model, frac=0.05, seed=0):
    """A random region over the 2-D projection weights of block 0."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < frac for n, p in model.named_parameters()
            if n.startswith("model.layers.0.") and p.ndim == 2}


def _train(model, pairs, mode, steps=3):
    opt = MaskedAdamW(pairs, lr=1e-2, mode=mode)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


@pytest.mark.parametrize("force_bias_norm", [True, False])
def test_set_semantics_and_force_bias_norm(force_bias_norm):
    model, _ = tiny_model("llama")
    region = _region(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = build_param_groups(model, region, force_bias_norm=force_bias_norm)
    _train(model, pairs, "sparse")
    named = dict(model.named_parameters())
    norms = [n for n in named if is_bias_or_norm(n)]
    assert norms
    for n, p in named.items():
        if n in region:
            assert p.requires_grad
            assert torch.equal(p[~region[n]], before[n][~region[n]])
            assert not torch.equal(p[region[n]], before[n][region[n]])
        elif n in norms:
            assert p.requires_grad == force_bias_norm
            assert torch.equal(p, before[n]) != force_bias_norm
        else:  # embeddings, lm_head, unselected matrices
            assert not p.requires_grad and torch.equal(p, before[n])


def test_spa_semantics():
    model, _ = tiny_model("llama")
    region = _region(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = build_param_groups(model, invert_masks(region), train_outside_mask=True)
    assert all(p.requires_grad for p in model.parameters())
    _train(model, pairs, "faithful")
    for n, p in model.named_parameters():
        if n in region:  # the region is frozen, the rest of the tensor trains
            assert torch.equal(p[region[n]], before[n][region[n]])
            assert not torch.equal(p[~region[n]], before[n][~region[n]])
        else:
            assert not torch.equal(p, before[n])
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])


def test_freeze_empty_false_keeps_grads_and_unknown_names_fail():
    model, _ = tiny_model("llama")
    pairs = build_param_groups(model, _region(model), freeze_empty=False)
    assert len(pairs) == len(list(model.parameters()))
    with pytest.raises(KeyError):
        build_param_groups(model, {"nope.weight": torch.ones(1, dtype=torch.bool)})


def _bf16_vs_fp32_run(mode, frac, steps=10, lr=3e-5):
    """A bf16 tiny model trained `steps` steps on real loss gradients, and an fp32 reference: the same initial
    weights (the bf16 values, upcast) fed the same gradients (the bf16 model's, upcast)."""
    model, _ = tiny_model("llama", seed=0)
    model = model.to(torch.bfloat16)
    region = _region(model, frac=frac, seed=1)
    named = dict(model.named_parameters())
    ref = {n: torch.nn.Parameter(named[n].detach().float()) for n in region}
    opt = MaskedAdamW([(named[n], m) for n, m in region.items()], lr=lr, mode=mode)
    opt_ref = MaskedAdamW([(ref[n], m) for n, m in region.items()], lr=lr, mode=mode)
    before = {n: named[n].detach().clone() for n in region}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in region:
        named[n].requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n in region:
            ref[n].grad = named[n].grad.float()
        opt.step()
        opt_ref.step()
    return model, region, named, ref, opt, before


@pytest.mark.parametrize("mode,frac", [("faithful", 0.05), ("sparse", 0.05), ("sparse", 0.95)])
def test_bf16_training_moves_entries_and_tracks_fp32(mode, frac):
    """At lr 3e-5 an update is below half a bf16 ulp of a typical weight: without fp32 masters the rounding
    swallows it at every step and most entries never move. With them, ≥ 90% of the trainable entries move in
    10 steps, the masters follow the fp32 run, and frozen entries stay bit-identical."""
    model, region, named, ref, opt, before = _bf16_vs_fp32_run(mode, frac)
    moved = sum(int((named[n].detach()[m] != before[n][m]).sum()) for n, m in region.items())
    total = sum(int(m.sum()) for m in region.values())
    assert moved >= 0.9 * total, f"only {moved}/{total} trainable bf16 entries moved"
    for n, m in region.items():
        p = named[n].detach()
        assert p.dtype == torch.bfloat16
        assert torch.equal(p[~m], before[n][~m])
        s = opt.state[named[n]]
        idx = opt.index(named[n])
        master = s["master"] if idx is not None else s["master"][m]
        assert s["master"].dtype == torch.float32
        if idx is not None:   # state proportional to the mask: no dense tensor
            assert all(v.numel() == idx.numel() for k, v in s.items() if torch.is_tensor(v))
        torch.testing.assert_close(master, ref[n].detach()[m].reshape(master.shape), rtol=1e-6, atol=1e-9)
        assert torch.equal(p[m].reshape(master.shape), master.to(torch.bfloat16))   # the param is its rounding


def test_fp32_params_keep_no_master():
    pairs = _params(dtypes=(torch.float32,) * 4)
    for mode in MODES:
        opt = _run(_clone(pairs), mode, steps=2)
        assert all("master" not in s for s in opt.state.values())
