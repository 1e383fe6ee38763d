"""SNIP and Wanda scores (docs/methods.md §2.1): brute-force known answers, per-sample |g|, every tiny family incl.
fused MoE experts, state left untouched (no .grad, requires_grad restored, hooks removed even on error),
determinism, bf16 ~ fp32 ranking, and a planted-region recovery test (docs/design.md §7)."""
import random

import pytest
import torch

from saferegions import arch, chat, tiny
from saferegions.methods.snip import snip_scores
from saferegions.methods.wanda import wanda_scores
from saferegions.models import eligible_weights
from saferegions.overlap import chance_iou, iou
from saferegions.regions import Region, top_fraction

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.",
           "Explain photosynthesis to a child, please."]
RESPONSES = ["Sure, here is a step by step guide.", "I'm sorry, but I can't.", "Once upon a time"]
MOE = tuple(f for f in arch.FAMILIES if arch.is_moe(f))


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


def _batches(tok, batch_size=2):
    """Rows of different lengths, so the batches are left-padded."""
    return list(chat.response_batches(tok, PROMPTS, RESPONSES, batch_size=batch_size))


def _rows(batches):
    """(input_ids, labels) of every row with its padding removed."""
    for b in batches:
        for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            yield ids[mask.bool()], labels[mask.bool()]


def _assert_close(got: dict, want: dict, rtol=1e-4):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max()
        torch.testing.assert_close(got[name], want[name].float(), rtol=rtol, atol=rtol * scale, msg=name)


# ---------------------------------------------------------------- known answers

def _brute_snip(model, batches):
    """Σ_s |∂L_s/∂W| by plain autograd, one sample at a time, on the padded row with the model's own
    `labels=` loss (position ids counted from the first real token), times |W|."""
    weights = eligible_weights(model)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()}
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            row = {k: v[i:i + 1] for k, v in b.items()}
            pos = (row["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            loss = model(**row, position_ids=pos).loss
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for n, g in zip(weights, grads):
                if g is not None:
                    acc[n] += g.abs()
    return {n: acc[n] * weights[n].detach().abs() for n in weights}


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral", "qwen2_moe"])
def test_snip_matches_brute_force_per_sample_autograd(tok, family):
    model, _ = tiny.tiny_model(family, tok)
    batches = _batches(tok)
    _assert_close(snip_scores(model, batches, progress=False), _brute_snip(model, batches))


def test_snip_takes_abs_per_sample(tok):
    """Scores add over samples, and differ from |W| * |sum of gradients| (abs after summing)."""
    model, _ = tiny.tiny_model("llama", tok)
    both = list(chat.response_batches(tok, PROMPTS[:2], RESPONSES[:2], batch_size=2))
    one = [list(chat.response_batches(tok, [p], [r])) for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    s_both = snip_scores(model, both, progress=False)
    s_sum = {n: a + b for (n, a), b in zip(snip_scores(model, one[0], progress=False).items(),
                                           snip_scores(model, one[1], progress=False).values())}
    _assert_close(s_both, s_sum)
    weights = eligible_weights(model)
    loss = sum(model(**b).loss for b in one[0] + one[1])
    grads = torch.autograd.grad(loss, list(weights.values()))
    summed_first = {n: (g.abs() * p.detach().abs()) for (n, p), g in zip(weights.items(), grads)}
    gap = sum((s_both[n] - summed_first[n]).abs().sum() for n in weights)
    assert gap > 1e-3 * sum(s.sum() for s in s_both.values())


def _brute_wanda(model, batches):
    """Σ over response positions of x_j², per sample and unpadded, / n_samples; square root; times |W|.
    Linear inputs are captured with forward hooks; expert inputs are recomputed token by token from the
    MoE block input: the router's top-k experts, then x (gate_up input) and act(x Wg^T) * (x Wu^T) (down)."""
    weights = eligible_weights(model)
    owner = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in weights}
    captured = {}                                       # Linear or MoE block -> its input in this forward
    watch = {m if isinstance(m, torch.nn.Linear) else model.get_submodule(n.rsplit(".", 2)[0])
             for n, m in owner.items()}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.__setitem__(mod, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for m in watch]
    sq = {n: torch.zeros(p.shape[0], p.shape[-1]) if p.dim() == 3 else torch.zeros(p.shape[-1])
          for n, p in weights.items()}
    n_samples = 0
    try:
        with torch.no_grad():
            for ids, labels in _rows(batches):
                model(input_ids=ids[None])
                n_samples += 1
                keep = labels != -100
                for name, module in owner.items():
                    if isinstance(module, torch.nn.Linear):
                        x = captured[module].reshape(keep.numel(), -1)[keep]
                        sq[name] += x.float().pow(2).sum(0)
                        continue
                    mlp = model.get_submodule(name.rsplit(".", 2)[0])
                    xs = captured[mlp].reshape(keep.numel(), -1)
                    top = (xs @ mlp.gate.weight.T).topk(mlp.gate.top_k, dim=-1).indices
                    inter = module.gate_up_proj.shape[1] // 2
                    for t in keep.nonzero().squeeze(1).tolist():
                        for e in top[t].tolist():
                            x = xs[t]
                            if name.endswith("gate_up_proj"):
                                sq[name][e] += x.float() ** 2
                            else:
                                wg, wu = module.gate_up_proj[e, :inter], module.gate_up_proj[e, inter:]
                                sq[name][e] += (module.act_fn(wg @ x) * (wu @ x)).float() ** 2
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, p in weights.items():
        norm = (sq[name] / n_samples).sqrt()
        out[name] = p.detach().abs().float() * (norm[None, :] if norm.dim() == 1 else norm[:, None, :])
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", *MOE])
def test_wanda_matches_manual_feature_norms(tok, family):
    model, _ = tiny.tiny_model(family, tok)
    _assert_close(wanda_scores(model, _batches(tok), progress=False), _brute_wanda(model, _batches(tok)))


def test_wanda_shared_inputs_give_identical_column_norms(tok):
    """q, k and v read the same input, as do gate and up: score / |W| is the same column vector."""
    model, _ = tiny.tiny_model("llama", tok)
    s = wanda_scores(model, _batches(tok), progress=False)
    w = eligible_weights(model)
    norm = {n: (s[n] / w[n].detach().abs())[0] for n in s}
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        for a, b in (("self_attn.q_proj", "self_attn.k_proj"), ("self_attn.q_proj", "self_attn.v_proj"),
                     ("mlp.gate_proj", "mlp.up_proj")):
            torch.testing.assert_close(norm[p + a + ".weight"], norm[p + b + ".weight"], rtol=1e-5, atol=0)


# ---------------------------------------------------------------- every family, state hygiene, determinism

@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
@pytest.mark.parametrize("method", [snip_scores, wanda_scores], ids=["snip", "wanda"])
def test_every_family_scores_clean_and_deterministic(tok, family, method):
    model, _ = tiny.tiny_model(family, tok)
    frozen = "model.embed_tokens.weight"
    dict(model.named_parameters())[frozen].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = eligible_weights(model)
    first = method(model, _batches(tok), progress=False)
    second = method(model, _batches(tok), progress=False)
    assert first.keys() == weights.keys()
    if family in MOE:
        assert any(p.dim() == 3 for p in weights.values())
    for name, s in first.items():
        assert s.shape == weights[name].shape and s.dtype == torch.float32 and s.device.type == "cpu"
        assert torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0, name
        assert torch.equal(s, second[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def _failing(batches):
    yield from batches[:1]
    raise RuntimeError("boom")


@pytest.mark.parametrize("method", [snip_scores, wanda_scores], ids=["snip", "wanda"])
def test_state_restored_after_an_exception(tok, method):
    model, _ = tiny.tiny_model("mixtral", tok)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        method(model, _failing(_batches(tok)), progress=False)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


@pytest.mark.parametrize("method", [snip_scores, wanda_scores], ids=["snip", "wanda"])
def test_bf16_scores_rank_like_fp32(tok, method):
    model, _ = tiny.tiny_model("llama", tok)
    s32 = method(model, _batches(tok), progress=False)
    s16 = method(model.to(torch.bfloat16), _batches(tok), progress=False)
    rho = [_spearman(s32[n], s16[n]) for n in s32]
    assert min(rho) > 0.9, rho


# ---------------------------------------------------------------- planted region (docs/design.md §7)

TRIGGER, CUE = "illegal", "sorry"
REFUSE, COMPLY = "I cannot help.", "Sure, here is"
WORDS = ["bread", "poem", "sea", "fox", "dog", "robot", "movie", "child", "time", "story", "guide", "answer",
         "materials", "step"]
PLANT_FRAC = 0.02


def _prompt(rng, cue=None):
    words = rng.sample(WORDS, 3)
    if cue:
        words.insert(rng.randrange(4), cue)
    return " ".join(words)


@torch.no_grad()
def _refusal_rate(model, tok, prompts):
    """Fraction of prompts whose greedy first response token is the refusal's first token."""
    enc = tok(chat.render(tok, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    first = model(**enc, position_ids=pos).logits[:, -1].argmax(-1)
    return (first == tok(REFUSE, add_special_tokens=False)["input_ids"][0]).float().mean().item()


def _loss(model, b):
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(**b, position_ids=pos).loss


@pytest.fixture(scope="module")
def planted(tok):
    """A tiny llama where a random 2% of the entries of every eligible matrix carries trigger-refusal.

    Phase A trains the whole model: prompts with the cue word "sorry" -> REFUSE; prompts with the trigger
    word "illegal" and plain prompts -> COMPLY. Phase B trains only the planted entries (gradient masked,
    every other weight frozen, embeddings and lm_head included) so that trigger prompts -> REFUSE while
    the rest keep their answers. The trigger-refusal then lives in the planted entries: reverting them to
    their phase-A values removes it (checked below)."""
    threads = torch.get_num_threads()   # module fixtures run before conftest's per-test one-thread fixture
    torch.set_num_threads(1)
    try:
        return _train_plant(tok)
    finally:
        torch.set_num_threads(threads)


def _train_plant(tok):
    torch.manual_seed(0)
    rng = random.Random(0)
    n = 24
    trig, cue, plain = ([_prompt(rng, c) for _ in range(n)] for c in (TRIGGER, CUE, None))
    prompts = trig + cue + plain

    def batch(ps, rs):
        return next(chat.response_batches(tok, ps, rs, batch_size=len(ps)))
    phase_a = batch(prompts, [COMPLY] * n + [REFUSE] * n + [COMPLY] * n)
    phase_b = batch(prompts, [REFUSE] * n + [REFUSE] * n + [COMPLY] * n)
    model, _ = tiny.tiny_model("llama", tok, hidden=32, ffn=64)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        _loss(model, phase_a).backward()
        opt.step()
    weights = eligible_weights(model)
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, p in weights.items():
        m = torch.zeros(p.numel(), dtype=torch.bool)
        m[torch.randperm(p.numel(), generator=g)[:int(PLANT_FRAC * p.numel())]] = True
        masks[name] = m.view(p.shape)
    before = {name: p.detach().clone() for name, p in weights.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [p.requires_grad_(True).register_hook(lambda grad, m=masks[name]: grad * m)
               for name, p in weights.items()]
    opt = torch.optim.Adam(weights.values(), lr=2e-2)
    for _ in range(50):
        opt.zero_grad()
        _loss(model, phase_b).backward()
        opt.step()
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    assert all(torch.equal(weights[k].detach()[~masks[k]], before[k][~masks[k]]) for k in weights)

    test = {c: [_prompt(rng, c) for _ in range(16)] for c in (TRIGGER, CUE, None)}
    refused = {c: _refusal_rate(model, tok, ps) for c, ps in test.items()}
    with torch.no_grad():
        after = {k: p.detach().clone() for k, p in weights.items()}
        for k, p in weights.items():
            p.copy_(before[k])
        reverted = {c: _refusal_rate(model, tok, ps) for c, ps in test.items()}
        for k, p in weights.items():
            p.copy_(after[k])
    # held-out trigger prompts are refused, and only because of the planted entries
    assert refused[TRIGGER] >= 0.75 and reverted[TRIGGER] <= 0.25, (refused, reverted)
    assert refused[CUE] >= 0.75 and reverted[CUE] >= 0.75 and refused[None] <= 0.25, (refused, reverted)
    scoring = list(chat.response_batches(tok, test[TRIGGER], [REFUSE] * 16, batch_size=8))
    return model, Region(masks), scoring


# IoU(top 2% per matrix, planted 2%); chance = f/(2-f) ≈ 0.01. Observed (seeded, CPU): SNIP ≈ 0.12,
# Wanda ≈ 0.29, plain |W| ≈ 0.51; scoring the cue or the plain prompts instead gives about the same IoUs.
# Both methods recover the plant far above chance, mostly through their |W| factor: the planted entries are
# the only ones that moved in phase B and grew ~5x larger than the frozen ones. The data factor cannot add
# much here by construction: Wanda's ‖X_j‖ depends on the input column only while the plant is spread over
# all columns (and Wanda reads response positions, where the trigger token itself never is), and SNIP's |g|
# is taken at a trained optimum of that very loss, where the planted entries' gradients are small.
# Asserted: at least 5x chance (>= 0.05).
@pytest.mark.parametrize("method", [snip_scores, wanda_scores], ids=["snip", "wanda"])
def test_planted_region_is_recovered_well_above_chance(planted, method):
    model, plant, scoring = planted
    region = top_fraction(method(model, scoring, progress=False), PLANT_FRAC, group="matrix")
    magnitude = top_fraction({k: p.detach().abs() for k, p in eligible_weights(model).items()}, PLANT_FRAC)
    chance = chance_iou(plant.density)
    got = iou(region, plant)
    print(f"\nplanted-region IoU {method.__name__}: {got:.3f}  (|W| alone {iou(magnitude, plant):.3f}, "
          f"chance {chance:.4f})")
    assert got >= max(5 * chance, 0.05)
