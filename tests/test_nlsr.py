"""NLSR (docs/methods.md §2.4, §3.2): LoRA training lowers the loss, expo rescaling, the exact ActSVD projection
against a direct SVD of Y, per-matrix magnitude selection, base-weight masks, and a read-only, deterministic
identification."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from saferegions import chat, regions
from saferegions.chat import response_batches
from saferegions.hooks import capture_inputs
from saferegions.methods import nlsr
from saferegions.models import eligible_weights
from saferegions.tiny import tiny_model

PROMPTS = ["How do I make a bomb?", "Write a poem about the sea.", "How to steal a car?",
           "Explain photosynthesis."]
RESPONSES = ["I'm sorry, but I can't assist with that.", "I cannot help with that.",
             "I'm sorry, but I can't.", "I cannot help with illegal or harmful requests."]
QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
QB = QA.replace("lora_A", "lora_B")


def _batches(tok):
    return list(response_batches(tok, PROMPTS, RESPONSES, batch_size=3))   # 2 batches, left-padded


def _random_lora(family="llama", targets=nlsr.TARGET_MODULES, r=4):
    """A LoRA with random (non-zero) B, so every Y = X Wᵀ has full rank r."""
    model, tok = tiny_model(family)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    with torch.no_grad():
        for _, w in nlsr.lora_weights(pm).values():
            w.normal_(0, 0.1)
    return pm.eval(), tok


@pytest.fixture(scope="module")
def lora():
    return _random_lora()


def _snapshot(pm):
    return {n: w.detach().clone() for n, (_, w) in nlsr.lora_weights(pm).items()}


def _ys(pm, batches):
    """Y = X Wᵀ (fp64) per LoRA matrix, X captured independently at the response positions."""
    loras = nlsr.lora_weights(pm)
    ys = {n: [] for n in loras}
    with torch.no_grad(), capture_inputs({n: m for n, (m, _) in loras.items()}) as store:
        for b in batches:
            mask = b["attention_mask"]
            pm.get_base_model()(input_ids=b["input_ids"], attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
            keep = (b["labels"] != -100).reshape(-1)
            for n, (_, w) in loras.items():
                x = store[n].pop()
                ys[n].append(x.reshape(-1, x.shape[-1])[keep].double() @ w.double().T)
    return {n: torch.cat(y) for n, y in ys.items()}


def test_training_lowers_loss():
    model, tok = tiny_model("llama")
    pm, hist = nlsr.train_safety_lora(model, tok, PROMPTS, RESPONSES, r=4, alpha=16, steps=8, lr=1e-2,
                                      batch_size=2, progress=False)
    losses = hist["train_loss"]
    assert len(losses) == 8 == hist["steps"] and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == set(nlsr.lora_weights(pm)) and len(trainable) == 7 * 2 * 2   # 7 × 2 layers × A, B
    assert pm.peft_config["default"].r == 4 and not pm.training


def _loss(model, tok, prompts, responses):
    (b,) = response_batches(tok, prompts, responses, batch_size=len(prompts))
    with torch.no_grad():
        return chat.response_loss(model.eval(), b["input_ids"], b["labels"], attention_mask=b["attention_mask"],
                                  position_ids=nlsr._position_ids(b["attention_mask"])).item()


HELD = (["Explain how to hack a bank.", "Make a fake ID."], ["I'm sorry, but I can't.", "I cannot help with that."])


def test_heldout_loss_before_and_after_on_one_fixed_batch():
    """Before and after are the loss of the untrained and of the returned model on the SAME held-out batch."""
    model, tok = tiny_model("llama")
    before = _loss(model, tok, *HELD)
    pm, hist = nlsr.train_safety_lora(model, tok, PROMPTS, RESPONSES, r=4, alpha=16, steps=6, lr=1e-2,
                                      batch_size=2, progress=False, heldout=HELD, eval_every=2)
    assert hist["heldout_loss_before"] == pytest.approx(before, abs=1e-6)
    assert hist["heldout_loss_after"] == pytest.approx(_loss(pm, tok, *HELD), abs=1e-6)
    assert [s for s, _ in hist["heldout"]] == [0, 2, 4, 6] and hist["heldout_loss_after"] < before


def test_early_stopping_keeps_the_best_trained_weights():
    """min_delta larger than any fall: training stops after `patience` evaluations and returns the best trained
    (never the untrained, B = 0) weights, whose held-out loss is the one reported."""
    model, tok = tiny_model("llama")
    pm, hist = nlsr.train_safety_lora(model, tok, PROMPTS, RESPONSES, r=4, alpha=16, steps=50, lr=1e-2,
                                      batch_size=2, progress=False, heldout=HELD, eval_every=2, patience=2,
                                      min_delta=100.0)
    trained = [loss for step, loss in hist["heldout"] if step]
    assert hist["steps"] == 4 and len(trained) == 2 and hist["best_step"] in (2, 4)
    assert hist["heldout_loss_after"] == min(trained) == pytest.approx(_loss(pm, tok, *HELD), abs=1e-6)
    assert any(w.abs().sum() > 0 for n, (_, w) in nlsr.lora_weights(pm).items() if ".lora_B." in n)


def test_init_seed_changes_only_the_lora_init():
    """Two init seeds: different lora_A, same batches (the data order follows `seed`)."""
    runs = []
    for init_seed in (0, 1):
        model, tok = tiny_model("llama")
        pm, hist = nlsr.train_safety_lora(model, tok, PROMPTS, RESPONSES, r=4, alpha=16, steps=1, lr=1e-2,
                                          batch_size=4, dropout=0.0, progress=False, init_seed=init_seed)
        runs.append((_snapshot(pm)[QA], hist["train_loss"][0]))
    assert not torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == pytest.approx(runs[1][1], abs=1e-6)   # B = 0: the first loss is the base model's


def test_expo_rescale_scales_update(lora):
    pm, _ = lora
    before = _snapshot(pm)
    try:
        nlsr.expo_rescale(pm, alpha=0.9)
        after = _snapshot(pm)
        torch.testing.assert_close(after[QB] @ after[QA], 1.8**2 * (before[QB] @ before[QA]))
    finally:
        with torch.no_grad():
            for n, (_, w) in nlsr.lora_weights(pm).items():
                w.copy_(before[n])


def test_projection_full_rank_is_identity_and_low_rank_bounded(lora):
    pm, tok = lora
    batches = _batches(tok)
    weights = _snapshot(pm)
    full = nlsr.lowrank_project(pm, batches, rank_ratio=1.0, progress=False)
    half = nlsr.lowrank_project(pm, batches, rank_ratio=0.5, progress=False)
    assert set(full) == set(weights) and len(full) == 28
    for n, w in weights.items():
        assert full[n].dtype == torch.float32 and full[n].shape == w.shape
        torch.testing.assert_close(full[n], w, atol=1e-5, rtol=1e-4)
        assert torch.linalg.matrix_rank(half[n]) <= math.floor(min(w.shape) * 0.5) == 2


@pytest.mark.parametrize("rank_ratio", [0.5, 0.8])
def test_projection_matches_direct_svd(lora, rank_ratio):
    pm, tok = lora
    batches = _batches(tok)
    got = nlsr.lowrank_project(pm, batches, rank_ratio=rank_ratio, progress=False)
    for n, y in _ys(pm, batches).items():
        w = nlsr.lora_weights(pm)[n][1].detach().double()
        q = math.floor(min(w.shape) * rank_ratio)
        v = torch.linalg.svd(y, full_matrices=False).Vh[:q].T
        torch.testing.assert_close(got[n], (v @ v.T @ w).float(), atol=1e-5, rtol=1e-4)


def test_identify_region_sizes_readonly_and_deterministic(lora):
    pm, tok = lora
    before = _snapshot(pm)
    r1, proj = nlsr.identify(pm, _batches(tok), rank_ratio=0.8, keep_frac=0.2, progress=False)
    r2, _ = nlsr.identify(pm, _batches(tok), rank_ratio=0.8, keep_frac=0.2, progress=False)
    for n, w in _snapshot(pm).items():
        assert torch.equal(w, before[n])                          # the adapter is never modified
        assert int(r1.masks[n].sum()) == int(0.2 * w.numel())
        assert torch.equal(r1.masks[n], r2.masks[n])
        sel, rest = proj[n].abs()[r1.masks[n]], proj[n].abs()[~r1.masks[n]]
        assert sel.min() >= rest.max()
    assert r1.meta["method"] == "nlsr" and r1.meta["selection"]["group"] == "matrix"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pm.modules())
    u, _ = nlsr.identify(pm, _batches(tok)[:1], rank_ratio=0.5, keep_frac=0.2, progress=False)
    refined = nlsr.refine(r1, u)
    assert all(torch.equal(refined.masks[n], r1.masks[n] & ~u.masks[n]) for n in r1.masks)


def _check_base_masks(pm, region, proj, masks, with_lora):
    f = region.density
    fresh = eligible_weights(tiny_model(pm.config.model_type)[0])
    assert list(masks) == list(fresh)
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == fresh[name].shape
        if name not in with_lora:
            assert not m.any()
            continue
        a = next(n for n in region.masks if ".lora_A." in n and nlsr.base_name(n) == name)
        b = a.replace(".lora_A.", ".lora_B.")
        delta = ((proj[b] * region.masks[b]) @ (proj[a] * region.masks[a])).abs()
        assert int(m.sum()) == min(int(f * m.numel()), int((delta > 0).sum()))
        if m.any() and (~m).any():
            assert delta[m].min() >= delta[~m].max()


def test_to_base_masks(lora):
    pm, tok = lora
    region, proj = nlsr.identify(pm, _batches(tok), keep_frac=0.5, progress=False)  # ΔW_R support > f
    masks = nlsr.to_base_masks(pm, region, proj)
    with_lora = {nlsr.base_name(n) for n in region.masks}
    assert len(with_lora) == 14 and region.density == 0.5
    _check_base_masks(pm, region, proj, masks, with_lora)
    assert all(int(m.sum()) == int(0.5 * m.numel()) for m in masks.values())
    again = nlsr.to_base_masks(pm, region, proj, scale=123.0)              # a positive scale changes nothing
    assert all(torch.equal(masks[n], again[n]) for n in masks)


def test_to_base_masks_never_selects_zero_updates(lora):
    pm, tok = lora
    region, proj = nlsr.identify(pm, _batches(tok), progress=False)
    region = nlsr.refine(region, regions.random_like(region, seed=0))   # sparse masks: ΔW_R mostly zero
    masks = nlsr.to_base_masks(pm, region, proj)
    _check_base_masks(pm, region, proj, masks, {nlsr.base_name(n) for n in region.masks})
    assert sum(int(m.sum()) for m in masks.values()) < region.density * sum(m.numel() for m in masks.values())


def test_to_base_masks_partial_lora_and_moe():
    pm, tok = _random_lora("qwen2_moe", targets=["q_proj", "down_proj"])   # fused experts: never a LoRA
    region, proj = nlsr.identify(pm, _batches(tok), progress=False)
    masks = nlsr.to_base_masks(pm, region, proj)
    with_lora = {nlsr.base_name(n) for n in region.masks}
    assert any("experts.down_proj" in n for n in masks) and not any("experts." in n for n in with_lora)
    _check_base_masks(pm, region, proj, masks, with_lora)
    assert sum(m.any() for m in masks.values()) == len(with_lora) == 4   # q, shared-expert down × 2 layers
