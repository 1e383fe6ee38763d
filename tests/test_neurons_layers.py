"""Neuron (SN-Tune-style) and layer (SafeLayer) regions: closed forms against brute-force ablation, selection
rules, projections to weight masks, hooks that never leak, and bit-exact weight restoration."""
import pytest
import torch

from saferegions.chat import response_batches
from saferegions.hooks import (capture_inputs, capture_outputs, edit_output, scale_output_dims,
                               scaled_weights, zero_input_dims)
from saferegions.methods import layer as SL
from saferegions.methods import neuron as NS
from saferegions.models import arch_of, block_modules, eligible_weights
from saferegions.tiny import tiny_model

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis."]
RESPONSES = ["Sure, here is a step by step guide.", "I'm sorry, but I can't.", "Once upon a time"]


def _batches(tok):
    return list(response_batches(tok, PROMPTS, RESPONSES, batch_size=2))   # 2 batches, left-padded


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")        # 4 query heads, 2 KV heads (GQA), head_dim 16, fp32


def _brute(model, batches, site, ablation):
    """Σ over response tokens of ‖h_¬N − h‖ of `site`'s output, `ablation()` active during the forward."""
    out = []
    for batch in batches:
        resp = NS._response_mask(batch)
        with capture_outputs({0: site}) as base:
            NS._forward(model, batch)
        with ablation(), capture_outputs({0: site}) as abl:
            NS._forward(model, batch)
        d = (abl[0][0] - base[0][0]).reshape(*resp.shape, -1).norm(dim=-1)
        out.append((d * resp).sum(-1))
    return torch.cat(out)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_moe", "olmoe", "qwen3"])
def test_scores_equal_bruteforce_ablation(family):
    model, tok = tiny_model(family)
    batches = _batches(tok)
    scores = NS.neuron_scores(model, batches, qk_mode="ablate", chunk=7)   # chunk not dividing the dims
    for layer in (0, 1):
        blk = block_modules(model)[layer]
        a = arch_of(model)
        attn, ffn = a.attention_of(blk), a.ffn_of(blk)
        cases = [("q", 5, attn.q_proj), ("q", 63, attn.q_proj), ("k", 9, attn.k_proj), ("v", 3, attn.v_proj),
                 ("v", 30, attn.v_proj)]
        for unit, j, proj in cases:
            expect = _brute(model, batches, attn.o_proj, lambda: scale_output_dims(proj, [j], 0.0))
            torch.testing.assert_close(scores[layer][unit][:, j], expect, rtol=1e-4, atol=1e-5)
        for j in (0, 17, 63):
            expect = _brute(model, batches, attn.o_proj, lambda: zero_input_dims(attn.o_proj, [j]))
            torch.testing.assert_close(scores[layer]["o"][:, j], expect, rtol=1e-4, atol=1e-5)
        if ffn is not None:
            for i in (0, 41):
                expect = _brute(model, batches, ffn.down_proj, lambda: zero_input_dims(ffn.down_proj, [i]))
                torch.testing.assert_close(scores[layer]["ffn"][:, i], expect, rtol=1e-4, atol=1e-5)
        else:
            assert scores[layer]["ffn"].shape == (len(PROMPTS), 0)
    assert _no_hooks(model)


def test_plnd_is_exact_without_rope(llama):
    """PLND's only approximation here is crediting post-RoPE dims to q/k_proj dims; with RoPE the identity it
    must agree with exact ablation (q and k, GQA)."""
    model, tok = llama
    batches = _batches(tok)

    def no_rope(module, args, out):
        return torch.ones_like(out[0]), torch.zeros_like(out[1])

    hook = model.model.rotary_emb.register_forward_hook(no_rope)
    try:
        exact = NS.neuron_scores(model, batches, qk_mode="ablate")
        approx = NS.neuron_scores(model, batches, qk_mode="plnd", chunk=5)
    finally:
        hook.remove()
    for layer in exact:
        for unit in ("q", "k"):
            torch.testing.assert_close(approx[layer][unit], exact[layer][unit], rtol=1e-4, atol=1e-5)
    with_rope = NS.neuron_scores(model, batches, qk_mode="plnd")
    assert all((with_rope[l][u] >= 0).all() for l in with_rope for u in ("q", "k"))


def _synthetic(per_prompt_top):
    """Scores where prompt p's single largest attention unit is q index per_prompt_top[p]."""
    scores = {}
    for layer in (0, 1):
        s = {u: torch.rand(len(per_prompt_top), 4) * 0.1 for u in ("q", "k", "v", "o")}
        s["ffn"] = torch.zeros(len(per_prompt_top), 0)
        for p, top in enumerate(per_prompt_top):
            s["q"][p, top] = 1.0
        scores[layer] = s
    return scores


def test_intersection_rule_and_empty_error():
    torch.manual_seed(0)
    units = NS.select_neurons(_synthetic([2, 2, 2, 2]), attn_frac=1 / 16)
    assert units[0] == {"ffn": [], "q": [2], "k": [], "v": [], "o": []}
    with pytest.raises(ValueError, match="no neuron"):
        NS.select_neurons(_synthetic([0, 1, 2, 3]), attn_frac=1 / 16)
    loose = NS.select_neurons(_synthetic([1, 1, 3, 0]), attn_frac=1 / 16, min_prompt_frac=0.5)
    assert loose[1]["q"] == [1]
    per_unit = NS.select_neurons(_synthetic([2, 2, 2, 2]), attn_frac=1 / 4, attn_rank="per_unit")
    assert per_unit[0]["q"] == [2]
    refined = NS.refine({0: {"q": [1, 2], "ffn": [5]}}, {0: {"q": [2]}})
    assert refined[0] == {"ffn": [5], "q": [1], "k": [], "v": [], "o": []}


def test_projection_masks_and_deactivate_agree(llama):
    model, tok = llama
    units = {0: {"ffn": [3, 100], "q": [1], "k": [2, 31], "v": [0], "o": [5]}, 1: {u: [] for u in NS.UNITS}}
    masks = NS.to_weight_masks(model, units)
    assert set(masks) == set(eligible_weights(model))
    p = "model.layers.0."
    assert masks[p + "mlp.gate_proj.weight"].nonzero()[:, 0].unique().tolist() == [3, 100]
    assert masks[p + "mlp.up_proj.weight"][[3, 100]].all() and masks[p + "mlp.up_proj.weight"].sum() == 2 * 64
    down = masks[p + "mlp.down_proj.weight"]
    assert down[:, [3, 100]].all() and down.sum() == 2 * 64
    assert masks[p + "self_attn.q_proj.weight"][1].all() and masks[p + "self_attn.q_proj.weight"].sum() == 64
    assert masks[p + "self_attn.k_proj.weight"].sum() == 2 * 64
    o = masks[p + "self_attn.o_proj.weight"]
    assert o[:, 5].all() and o.sum() == 64
    assert not any(m.any() for n, m in masks.items() if ".layers.1." in n)

    # Zeroing the masked weights (no biases in llama) must equal deactivating the neurons by hooks.
    batch = _batches(tok)[0]
    with NS.deactivate(model, units):
        hooked = NS._forward(model, batch).logits
    assert _no_hooks(model)
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n, m in masks.items():
                params[n][m] = 0
        zeroed = NS._forward(model, batch).logits
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_weight_density_counts_the_projected_masks(family):
    model, _ = tiny_model(family)
    units = {0: {"ffn": [3, 10], "q": [1], "k": [2, 31], "v": [0], "o": [5, 6]}, 1: {"ffn": [7], "o": [1]}}
    masks = NS.to_weight_masks(model, units)
    expect = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert NS.weight_density(model, {str(l): u for l, u in units.items()}) == pytest.approx(expect, rel=1e-12)


def test_density_vs_n_is_non_increasing_for_the_strict_intersection(llama):
    """SN-Tune's safety neurons are the intersection over prompts: every extra prompt can only remove neurons, so
    the density over the first n prompts never rises, and at n = all it is the region's own density."""
    model, tok = llama
    prompts = [f"{p} ({i})" for i in range(3) for p in PROMPTS]
    batches = list(response_batches(tok, prompts, RESPONSES * 3, batch_size=4))
    scores = NS.neuron_scores(model, batches, qk_mode="plnd")
    curve = [NS.density_after(model, scores, k, 0.25, 0.5) for k in range(1, len(prompts) + 1)]
    assert all(b <= a for a, b in zip(curve, curve[1:])) and curve[0] > curve[-1] > 0
    assert curve[-1] == NS.weight_density(model, NS.select_neurons(scores, 0.25, 0.5))
    loose = [NS.density_after(model, scores, k, 0.25, 0.5, min_prompt_frac=0.5) for k in (1, 9)]
    assert loose[1] > curve[8]                                  # a looser rule keeps more


def test_moe_projection_uses_shared_expert_only():
    model, _ = tiny_model("qwen2_moe")
    masks = NS.to_weight_masks(model, {0: {"ffn": [7]}})
    assert masks["model.layers.0.mlp.shared_expert.gate_proj.weight"][7].all()
    assert not any(m.any() for n, m in masks.items() if ".experts." in n)
    with pytest.raises(NotImplementedError):
        with NS.deactivate(tiny_model("mixtral")[0], {0: {"ffn": [1]}}):
            pass


def test_hooks_removed_after_exception(llama):
    model, tok = llama
    attn = block_modules(model)[0].self_attn
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    managers = [lambda: capture_inputs({0: attn.o_proj}), lambda: capture_outputs({0: attn}),
                lambda: edit_output(attn.q_proj, lambda y: y * 0), lambda: zero_input_dims(attn.o_proj, [1]),
                lambda: NS.deactivate(model, {0: {"q": [1], "o": [2], "ffn": [3]}}),
                lambda: scaled_weights(model, SL.layer_weight_names(model, [0, 1]), 3.0)]
    for make in managers:
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                NS._forward(model, _batches(tok)[0])
                raise RuntimeError("boom")
        assert _no_hooks(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    name = "model.layers.1.mlp.down_proj.weight"
    with scaled_weights(model, [name], 1.1):
        torch.testing.assert_close(dict(model.named_parameters())[name], before[name] * 1.1)


def test_layer_cosine_matches_naive_pairs(llama):
    model, tok = llama
    normal = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis.", "Hi"]
    malicious = ["Give step by step instructions to do harm.", "Help with illegal requests", "Bad thing"]
    stats = SL.layer_cosine(model, tok, normal, malicious, pairs=25, seed=3, batch_size=3)
    assert len(stats["nn_mean"]) == 2
    single = {p: SL.last_token_states(model, tok, [p], batch_size=1)[:, 0] for p in normal + malicious}
    pools = {"nn": (normal, normal), "mm": (malicious, malicious), "nm": (normal, malicious)}
    for kind, (a, b) in pools.items():
        pairs = stats["pairs"][kind]
        if kind != "nm":
            assert all(i != j for i, j in pairs)
        cos = torch.nn.functional.cosine_similarity
        sims = torch.tensor([[cos(single[a[i]][l], single[b[j]][l], dim=0).item() for i, j in pairs]
                             for l in range(2)])
        torch.testing.assert_close(torch.tensor(stats[f"{kind}_mean"]), sims.mean(1), rtol=0, atol=1e-5)
        std = torch.tensor(stats[f"{kind}_std"])
        torch.testing.assert_close(std, sims.std(1, correction=0), rtol=0, atol=1e-5)


def test_gap_range_on_synthetic_curves():
    L = 10
    nm = [0.9, 0.9, 0.9, 0.85, 0.80, 0.78, 0.77995, 0.77995, 0.7799, 0.7799]
    stats = {"nn_mean": [0.9] * L, "mm_mean": [0.9] * L, "nm_mean": nm}
    assert SL.gap_range(stats) == (3, 6)
    assert SL.gap_range(stats, grow=1e-5) == (3, 7)
    with pytest.raises(ValueError, match="never jumps"):
        SL.gap_range({"nn_mean": [0.9] * L, "mm_mean": [0.9] * L, "nm_mean": [0.9] * L})


def test_sweep_restores_weights_bit_exactly(llama):
    model, tok = llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def judge(responses):
        seen.append(float(model.model.layers[0].self_attn.o_proj.weight.abs().sum()))
        return [len(r) % 2 == 0 for r in responses]

    out = SL.overrejection_sweep(model, tok, PROMPTS[:2], 1, 2, judge=judge, radius=1, max_new_tokens=3,
                                 sweep_start=True, alpha=1.5)
    assert [(r["start"], r["end"]) for r in out["table"]] == [(0, 1), (0, 2), (1, 2)]
    assert out["best"] in {(r["start"], r["end"]) for r in out["table"]}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(set(seen)) == 2     # layer 0 scaled in some candidates, unscaled in others and the baseline
    no_o = SL.layer_weight_names(model, [1], include_o=False)
    assert len(no_o) == 6 and not any("o_proj" in n for n in no_o)
    masks = SL.to_weight_masks(model, [1])
    assert all(m.all() == (".layers.1." in n) and m.any() == (".layers.1." in n) for n, m in masks.items())
