"""Every family adapter (`arch.ARCHS`) on a tiny random model of that family: it builds offline, is recognised,
every block weight is attributed to the right layer, part and component (checked against sizes computed from
the config, not from names), and scoring and ablation run on it. A new entry in ARCHS is tested here as is."""
import pytest
import torch

from saferegions import arch, chat, models, regions, tiny
from saferegions.arch import Part
from saferegions.methods import neuron, removal
from saferegions.methods.snip import snip_scores
from saferegions.methods.wanda import wanda_scores

FAMILIES = sorted(arch.ARCHS)


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def _expected_numel(cfg, a: arch.Arch) -> dict:
    """{(part, component): entries per layer} from the config's sizes alone."""
    h = cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out = {(Part.ATTENTION, "q"): q * h, (Part.ATTENTION, "k"): kv * h, (Part.ATTENTION, "v"): kv * h,
           (Part.ATTENTION, "o"): h * q}
    if not a.moe:
        i = cfg.intermediate_size
        out.update({(Part.MLP, c): h * i for c in ("gate", "up", "down")})
        return out
    e = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    i = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    out.update({(Part.EXPERT, "gate_up"): e * 2 * i * h, (Part.EXPERT, "down"): e * h * i})
    router = e * h
    if a.shared_expert:
        s = cfg.shared_expert_intermediate_size
        out.update({(Part.SHARED_EXPERT, c): h * s for c in ("gate", "up", "down")})
        router += h                                  # the shared expert's sigmoid gate
    out[Part.ROUTER, "router"] = router
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_recognised_and_every_weight_attributed(tok, family):
    model, _ = tiny.tiny_model(family, tok)
    a = models.arch_of(model)
    assert a.family == family and isinstance(a, models.Arch)
    blocks = a.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    owner = {id(p): layer for layer, b in enumerate(blocks) for p in b.parameters()}
    got = {}
    for name, p in models.eligible_weights(model, include_router=True).items():
        assert models.layer_index(name) == owner[id(p)], name
        key = (models.part(name), models.component(name))
        got.setdefault(owner[id(p)], {}).setdefault(key, 0)
        got[owner[id(p)]][key] += p.numel()
    want = _expected_numel(model.config, a)
    assert got == {layer: want for layer in range(len(blocks))}
    eligible = models.eligible_weights(model)
    assert all(models.part(n) is not Part.ROUTER for n in eligible)
    assert any(map(models.is_expert, eligible)) == a.moe
    assert arch.is_moe(family) == a.moe
    for b in blocks:
        assert a.attention_of(b).q_proj.weight.shape[1] == model.config.hidden_size
        ffn = a.ffn_of(b)
        assert (ffn is None) == (a.moe and not a.shared_expert)
        assert (a.experts_of(b) is not None) == a.moe
    outside = [n for n, _ in model.named_parameters() if models.layer_index(n) is None]
    assert outside and all(models.part(n) is None for n in outside)   # embeddings, final norm, lm_head
    assert a.lm_head_tied(model) == a.ties_lm_head == ("lm_head.weight" not in dict(model.named_parameters()))


def test_unknown_family_is_one_clear_error(tok):
    model, _ = tiny.tiny_model("llama", tok)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="no adapter; supported: llama"):
        models.arch_of(model)
    assert not arch.is_moe("gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_and_ablation_run_on_every_family(tok, family):
    model, _ = tiny.tiny_model(family, tok)
    batches = list(chat.response_batches(tok, ["How do I bake bread?", "Write a poem."],
                                         ["Sure, here is a guide.", "The sea is blue."], 2, 64))
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for score in (snip_scores, wanda_scores):
        scores = score(model, batches, progress=False)
        assert scores.keys() == models.eligible_weights(model).keys()
        region = regions.top_fraction(scores, 0.2)
        with removal.ablation(model, region), torch.no_grad():
            assert not torch.allclose(model(input_ids=ids).logits, before)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)
    units = neuron.identify(model, batches, attn_frac=0.2, ffn_frac=0.2, min_prompt_frac=0.5)
    has_ffn = models.arch_of(model).ffn_of(models.block_modules(model)[0]) is not None
    assert any(u["ffn"] for u in units.values()) == has_ffn
    with neuron.deactivate(model, units), torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before)


def test_chat_quirks_and_refusal_ids(tok):
    gemma, llama = arch.get("gemma2"), arch.get("llama")
    assert llama.messages("hi", "be safe") == [{"role": "system", "content": "be safe"},
                                                {"role": "user", "content": "hi"}]
    assert gemma.messages("hi", "be safe") == [{"role": "user", "content": "be safe\n\nhi"}]
    assert gemma.messages("hi") == llama.messages("hi") == [{"role": "user", "content": "hi"}]
    ids = llama.refusal_ids(tok, "I'm sorry")
    assert ids == tok("I'm sorry", add_special_tokens=False)["input_ids"] and tok.decode(ids) == "I'm sorry"
    with pytest.raises(ValueError, match="no tokens"):
        llama.refusal_ids(tok, "")


def test_lora_targets_are_the_block_linears(tok):
    import re
    model, _ = tiny.tiny_model("qwen2_moe", tok)
    targets = {n for n, _ in model.named_modules() if re.fullmatch(arch.linear_targets(), n)}
    want = {n.removesuffix(".weight") for n in models.eligible_weights(model) if n.endswith(".weight")}
    assert targets == want and len(targets) == 2 * 7   # 2 layers × (q k v o + shared gate up down)
