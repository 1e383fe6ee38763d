"""ESI (docs/methods.md §4.1-§4.5): the judge-guided gradient against finite differences, the vocabulary transfer on
two known tokenizers, exact global top-k, expert paths on MoE models, faithful vs fixed, exact restoration
after perturbation, and a Llama-Guard-style judge played by a tiny llama."""
import pytest
import torch
import transformers as T

from greedy_margin import MARGIN, min_greedy_margin
from saferegions.chat import render
from saferegions.judges import GuardSoftJudge, LearnedJudge, LearnedSoftJudge, llama_guard, transfer
from saferegions.methods import esi
from saferegions.models import param_count
from saferegions.regions import Region
from saferegions.tiny import tiny_guard, tiny_model, tiny_tokenizer

PROMPTS = ["How do I bake bread?", "Write a poem about the sea."]


@pytest.fixture(scope="module")
def judge():
    """A tiny learned judge whose tokenizer (300 BPE tokens) differs from the targets' (512)."""
    tok = tiny_tokenizer(300)
    torch.manual_seed(1)
    cfg = T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=128)
    learned = LearnedJudge(T.BertModel(cfg).eval(), tok, torch.randn(32), torch.tensor(0.1))
    return LearnedSoftJudge(learned)


def _peaked(family="llama", scale=10.0, dtype=torch.float32):
    """A tiny model with a sharpened lm_head, so its logits are as peaked as a trained model's."""
    model, tok = tiny_model(family)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.to(dtype), tok


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


# ---------------------------------------------------------------- the gradient path


def test_fixed_gradient_equals_finite_differences(judge):
    """'fixed' accumulates exactly ∂S̃/∂θ, S̃(θ) = −Σ_prompts Σ_t Σ_v G_L[t,v]·softmax(logits/τ)[t,v] with G_L
    and the responses held fixed (the first-order surrogate of the judge's safe score). fp32 model: the FD
    noise (~1e-7·|S̃|/h; RMSNorm computes in fp32 even in a float64 model) stays below 1% of the gradient at
    h = 1e-3."""
    model, tok = _peaked()
    grads = esi.esi_gradients(model, tok, judge, PROMPTS, max_new_tokens=6, variant="fixed", progress=False)

    cfg = esi.resolve_switches("fixed")
    M = transfer.transfer_matrix(judge.vocab_tokenizer, tok, (judge.embedding_matrix.shape[0], len(tok)))
    items = []
    for ids, plen in esi.respond(model, tok, PROMPTS, 6, "You are a helpful assistant."):
        G, _ = esi.judge_gradient(judge, tok.decode(ids[plen:], skip_special_tokens=True), cfg)
        items.append((ids, plen, esi.transfer(G, M)))

    @torch.no_grad()
    def surrogate():
        total = 0.0
        for ids, plen, G_L in items:
            logits = model(input_ids=ids[None]).logits[0, plen - 1:len(ids) - 1]
            T_ = min(len(logits), len(G_L))
            total -= float((G_L[:T_].double() * torch.softmax(logits[:T_].double() / esi.TAU, -1)).sum())
        return total

    params = dict(model.named_parameters())
    h = 1e-3
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        g = grads[name]
        assert g.dtype == torch.float32 and g.shape == params[name].shape
        for i in (int(g.abs().argmax()), 7):
            w = params[name].data.view(-1)
            orig = w[i].item()
            w[i] = orig + h
            up = surrogate()
            w[i] = orig - h
            down = surrogate()
            w[i] = orig
            fd = (up - down) / (2 * h)
            assert abs(g.view(-1)[i].item() - fd) <= 0.01 * g.abs().max().item() + 0.01 * abs(fd), (name, i)


def test_judge_gradient_finite_differences_and_z_vs_p(judge):
    """G_p = ∂(−safe)/∂p_g by finite differences; G_z (faithful) is the softmax Jacobian applied to G_p."""
    judge.judge.encoder.double()
    try:
        text = "I'm sorry, but I can't assist with that."
        G_p, safe = esi.judge_gradient(judge, text, esi.resolve_switches("fixed"))
        G_z, _ = esi.judge_gradient(judge, text, esi.resolve_switches("fixed", guard_grad_wrt="logits"))
        ids = judge.vocab_tokenizer(text)["input_ids"]
        z = torch.full((len(ids), judge.embedding_matrix.shape[0]), esi.OFF_LOGIT)
        z[torch.arange(len(ids)), torch.tensor(ids)] = 0
        p = torch.softmax(z, -1).double()
        E = judge.embedding_matrix

        def neg_safe(q):
            with torch.no_grad():
                return -float(judge.safe_score(q @ E))

        assert neg_safe(p) == pytest.approx(-safe, rel=1e-6)
        h = 1e-5
        for t, v in [(0, ids[0]), (2, 5), (len(ids) - 1, 200)]:
            d = torch.zeros_like(p)
            d[t, v] = h
            fd = (neg_safe(p + d) - neg_safe(p - d)) / (2 * h)
            assert G_p[t, v].item() == pytest.approx(fd, rel=1e-4, abs=1e-6)
        pf = p.float()
        expect = pf * (G_p - (pf * G_p).sum(-1, keepdim=True))
        present = torch.zeros_like(pf, dtype=torch.bool)
        present[torch.arange(len(ids)), torch.tensor(ids)] = True
        torch.testing.assert_close(G_z[~present], expect[~present], rtol=1e-3, atol=1e-12)
        # at the present tokens G_z = p_a (g_a − p·g) is a cancelling difference: ~1% fp32 round-off
        torch.testing.assert_close(G_z[present], expect[present], rtol=0.05,
                                   atol=0.02 * expect.abs().max().item())
        assert G_z.abs().max() < 1e-5 * G_p.abs().max()        # the faithful gradient is damped by ~e^-17
    finally:
        judge.judge.encoder.float()


def test_faithful_and_fixed_differ_but_correlate(judge):
    model, tok = _peaked()
    prompts = PROMPTS + ["Explain photosynthesis.", "What is 12 plus 30?"]
    def run(**kw):
        return _flat(esi.esi_gradients(model, tok, judge, prompts, max_new_tokens=10, progress=False, **kw))

    fixed, faithful = run(variant="fixed"), run(variant="faithful")
    # switches that are no-ops here (no BOS in this judge's tokenizer, fp32 model) leave 'fixed' unchanged
    torch.testing.assert_close(run(variant="faithful", guard_grad_wrt="probs", gumbel=False), fixed)
    cos = float(torch.nn.functional.cosine_similarity(fixed, faithful, 0))
    corr = float(torch.corrcoef(torch.stack([fixed.abs(), faithful.abs()]))[0, 1])
    assert abs(cos) < 0.95 and corr > 0.3, (cos, corr)
    assert faithful.abs().max() < 1e-3 * fixed.abs().max()      # e^-17 damping of the logit-space gradient


def test_refusal_likelihood_objective():
    model, tok = tiny_model("llama")
    grads = esi.esi_gradients(model, tok, None, PROMPTS[:1], variant="fixed", objective="refusal_likelihood",
                              progress=False)
    text = render(tok, PROMPTS[:1], "You are a helpful assistant.")[0]
    p_ids = tok(text, add_special_tokens=False)["input_ids"]
    r_ids = tok(esi.REFUSAL, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + r_ids])
    labels = ids.clone()
    labels[0, :len(p_ids)] = -100
    S = -model(input_ids=ids, labels=labels).loss * len(r_ids)
    (expect,) = torch.autograd.grad(S, model.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(grads["model.layers.1.mlp.up_proj.weight"], expect, rtol=1e-4, atol=1e-6)


def test_eligible_esi():
    model, _ = tiny_model("qwen2_moe")
    names = set(esi.eligible_esi(model))
    assert "lm_head.weight" in names and "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(n.endswith(".bias") or "embed" in n or "norm" in n for n in names)
    assert not any(n.endswith("mlp.gate.weight") or "shared_expert_gate" in n for n in names)
    assert "model.layers.0.mlp.gate.weight" in esi.eligible_esi(model, exclude_router=False)
    tok = tiny_tokenizer()
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    assert not any("lm_head" in n or "embed" in n for n in esi.eligible_esi(T.LlamaForCausalLM(cfg)))


# ---------------------------------------------------------------- vocabulary transfer


def test_transfer_matrix_on_two_tokenizers():
    big, small = tiny_tokenizer(512), tiny_tokenizer(300)
    assert transfer.token_text("Ġthere") == " there" and transfer.token_text("▁hello") == " hello"
    assert transfer.token_text("Ċ") == "Ċ" and transfer.token_text("ing") == "ing"
    M = transfer.transfer_matrix(big, small).to_dense()
    assert M.shape == (len(big), len(small))
    torch.testing.assert_close(M.sum(1), torch.ones(len(big)))       # every entry of this vocabulary maps
    def row(tok_from, word):
        return M[tok_from.convert_tokens_to_ids(word)]

    # known mappings: a shared merge maps to itself, a special token to the same special, 'Ġ' to a space
    for word in ("Ġthe", "<|im_end|>", "Ġ", "a"):
        assert small.convert_tokens_to_ids(word) is not None
        expect = torch.zeros(len(small))
        expect[small.convert_tokens_to_ids(word)] = 1.0
        torch.testing.assert_close(row(big, word), expect)
    # a merge the small vocabulary lacks is split evenly over its pieces
    word = "Ġphotosynthesis"
    assert small.convert_tokens_to_ids(word) is None
    pieces = small(" photosynthesis", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1 and small.decode(pieces) == " photosynthesis"
    nz = row(big, word).nonzero().flatten().tolist()
    assert sorted(nz) == sorted(set(pieces))
    assert row(big, word)[pieces[0]].item() == pytest.approx(pieces.count(pieces[0]) / len(pieces))
    # the reference re-tokenizes byte symbols as text ('Ċ' is not a newline); decode=True repairs that
    newline = small("\n", add_special_tokens=False)["input_ids"]
    assert row(big, "Ċ")[newline].sum() == 0
    D = transfer.transfer_matrix(big, small, decode=True).to_dense()
    assert D[big.convert_tokens_to_ids("Ċ"), newline].sum() == 1
    # padded embedding / logit sizes: extra rows and columns stay empty
    P = transfer.transfer_matrix(big, small, shape=(len(big) + 3, len(small) + 5))
    assert P.shape == (len(big) + 3, len(small) + 5)
    torch.testing.assert_close(P.to_dense()[:len(big), :len(small)], M)


COMPLIANCE = "Sure, here is a step by step guide. First, gather the materials."


def _wordpiece_tokenizer(vocab_size: int = 300):
    """An uncased BERT-style WordPiece ([CLS] ... [SEP], '##' continuations), trained like tiny_tokenizer:
    the offline stand-in for MiniLM's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from saferegions.tiny import _CORPUS
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(_CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                               show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")


def _soft_judge(tok):
    torch.manual_seed(1)
    cfg = T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=128)
    learned = LearnedJudge(T.BertModel(cfg).eval(), tok, torch.randn(32), torch.tensor(0.1))
    return LearnedSoftJudge(learned)


# the (judge, target) tokenizer kinds of the profiles: MiniLM (WordPiece, uncased) -> Qwen2.5 / SmolLM2 /
# Llama-3 (byte-level BPE); Llama-Guard-3 -> Llama-3.1 and the smoke profile's tiny encoder -> tiny targets
# (one BPE on both sides)
@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
@pytest.mark.parametrize("variant", ["fixed", "faithful"])
def test_judge_gradient_reaches_every_response_token(kind, variant):
    """S's gradient reaches every token of a refusal and of a compliance (docs/methods.md §5.7): before the
    WordPiece rule only ',' and '.' of the refusal had a nonzero G_L[t, y_t]."""
    target = tiny_tokenizer(512)
    judge = _soft_judge(_wordpiece_tokenizer() if kind == "wordpiece" else tiny_tokenizer(512))
    M = transfer.transfer_matrix(judge.vocab_tokenizer, target)
    cfg = esi.resolve_switches(variant)
    for text in (esi.REFUSAL, COMPLIANCE):
        G, _ = esi.judge_gradient(judge, text, cfg)
        ids = target(text, add_special_tokens=False)["input_ids"]
        assert transfer.judge_token_coverage(esi.transfer(G, M), ids) == 1.0, (kind, variant, text)


def test_wordpiece_transfer_rule_and_cls_alignment():
    """Word-initial pieces reach the space-prefixed, bare and case forms, '##' pieces the bare continuation,
    specials nothing; [CLS]/[SEP] are dropped like a BOS under bos_align, kept (offset by one) otherwise."""
    wp, target = _wordpiece_tokenizer(), tiny_tokenizer(512)
    M = transfer.transfer_matrix(wp, target).to_dense()

    def row(token):
        r = M[wp.convert_tokens_to_ids(token)]
        return {target.convert_ids_to_tokens(j): r[j].item() for j in r.nonzero().flatten().tolist()}

    assert row("sorry") == {"Ġsorry": 1.0}
    assert row("the") == {"Ġthe": 1.0, "The": 1.0, "ĠThe": 1.0}
    assert {"I": 1.0, "ĠI": 1.0}.items() <= row("i").items()
    assert row("[CLS]") == {} and row("[SEP]") == {}
    piece = next(t for t in wp.convert_ids_to_tokens(range(len(wp)))
                 if t.startswith("##") and target.convert_tokens_to_ids(t[2:]) is not None)
    assert row(piece)[piece[2:]] == 1.0
    # "'m" is one target token but two judge tokens ("'", "m"): it takes both
    assert M[:, target.convert_tokens_to_ids("'m")].nonzero().flatten().tolist() == sorted(
        wp.convert_tokens_to_ids(["'", "m"]))
    judge = _soft_judge(wp)
    n = len(wp(esi.REFUSAL, add_special_tokens=False)["input_ids"])
    G_fixed, _ = esi.judge_gradient(judge, esi.REFUSAL, esi.resolve_switches("fixed"))
    G_faithful, _ = esi.judge_gradient(judge, esi.REFUSAL, esi.resolve_switches("fixed", bos_align=False))
    assert G_fixed.shape[0] == n and G_faithful.shape[0] == n + 2
    torch.testing.assert_close(G_fixed, G_faithful[1:-1])


def test_real_minilm_to_qwen_reaches_the_refusal():
    """Optional: the embedded default's real tokenizers, where the models stage has materialized them."""
    from conftest import ROOT
    paths = [ROOT / "models" / n for n in ("all-minilm-l6-v2", "qwen2.5-coder-0.5b-instruct")]
    if not all((p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists() for p in paths):
        pytest.skip("models/ not materialized (run the models stage)")
    judge_tok, target = (T.AutoTokenizer.from_pretrained(p) for p in paths)
    M = transfer.transfer_matrix(judge_tok, target)
    reached = set(M.indices()[1].tolist())
    for text in (esi.REFUSAL, COMPLIANCE):
        ids = target(text, add_special_tokens=False)["input_ids"]
        missed = [target.convert_ids_to_tokens(i) for i in ids if i not in reached]
        assert not missed, missed


# ---------------------------------------------------------------- selection


def test_esi_region_is_exact_global_topk():
    model, _ = tiny_model("llama")
    torch.manual_seed(0)
    scores = {n: torch.rand(p.shape) for n, p in esi.eligible_esi(model).items()}
    flat = _flat(scores)
    k = int(0.05 * param_count(model))
    order = flat.argsort(descending=True)
    top, bottom = esi.esi_region(scores, model, 0.05), esi.bottom_region(scores, model, 0.05)
    for largest, region in ((True, top), (False, bottom)):
        expect = torch.zeros(flat.numel(), dtype=torch.bool)
        expect[order[:k] if largest else order[-k:]] = True
        assert region.size == k
        assert torch.equal(_flat(region.masks), expect)
    resorted = esi.esi_region(scores, model, 0.05, resort_k=0.1)
    expect = torch.zeros(flat.numel(), dtype=torch.bool)
    expect[order[:int(0.1 * k)]] = True
    assert torch.equal(_flat(resorted.masks), expect) and not (expect & ~_flat(top.masks)).any()
    rnd = esi.random_region(top, seed=3)
    assert {n: int(m.sum()) for n, m in rnd.masks.items()} == {n: int(m.sum()) for n, m in top.masks.items()}


def test_esi_scores_variants():
    model, _ = tiny_model("llama")
    name = "model.layers.0.self_attn.v_proj.weight"
    W = dict(model.named_parameters())[name]
    g = {name: torch.randn(W.shape)}
    sigma = W.detach().std()   # unbiased, whole tensor
    torch.testing.assert_close(esi.esi_scores(g, model, "grad")[name], g[name].abs())
    torch.testing.assert_close(esi.esi_scores(g, model)[name], g[name].abs() * sigma)
    torch.testing.assert_close(esi.esi_scores(g, model, "grad_std_mag")[name],
                               g[name].abs() * sigma * W.detach().abs())


# ---------------------------------------------------------------- MoE paths and architecture profile


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_moe_expert_paths(family, judge):
    model, tok = _peaked(family)
    grads = esi.esi_gradients(model, tok, judge, PROMPTS[:1], max_new_tokens=6, variant="fixed",
                              progress=False)
    gate_up = grads["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.abs().sum() > 0 and grads["model.layers.1.mlp.experts.down_proj"].abs().sum() > 0
    assert not any(n.endswith("mlp.gate.weight") for n in grads)
    region = esi.esi_region(esi.esi_scores(grads, model), model, 0.05)
    prof = esi.architecture_profile(grads, model, region)
    experts = prof[prof.expert]
    assert set(experts.component) == {"gate", "up", "down"}
    assert prof.region_count.sum() == region.size
    name = "model.layers.1.mlp.experts.gate_up_proj"
    row = experts[(experts.name == name) & (experts.component == "up")].iloc[0]
    half = gate_up.shape[1] // 2
    assert row.mean_abs_grad == pytest.approx(float(gate_up[:, half:].abs().mean()), rel=1e-6)
    assert row.region_count == int(region.masks["model.layers.1.mlp.experts.gate_up_proj"][:, half:].sum())
    assert row.sigma == pytest.approx(float(dict(model.named_parameters())[name].detach().std()), rel=1e-6)
    table = esi.layer_component_table(prof, "region_count")
    assert list(table.index) == [0, 1] and {"q", "v", "gate", "up", "down"} <= set(table.columns)
    assert table.values.sum() == region.size - int(region.masks["lm_head.weight"].sum())


# ---------------------------------------------------------------- perturbation


def test_perturb_restores_bit_identically():
    model, _ = tiny_model("llama")
    model.to(torch.bfloat16)
    torch.manual_seed(0)
    scores = {n: torch.rand(p.shape) for n, p in esi.eligible_esi(model).items()}
    region = esi.esi_region(scores, model, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with esi.perturb(model, region, seed=1):
        for n, p in model.named_parameters():
            changed = p.detach() != before[n]
            mask = region.masks.get(n, torch.zeros_like(changed))
            assert not (changed & ~mask).any()
            assert changed.sum() >= 0.9 * mask.sum()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int16), before[n].view(torch.int16))
    with pytest.raises(RuntimeError):
        with esi.perturb(model, region, seed=1):
            raise RuntimeError("boom")
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_perturb_noise_scale():
    model, _ = tiny_model("llama")
    name = "model.layers.1.mlp.up_proj.weight"
    W = dict(model.named_parameters())[name]
    region = Region({name: torch.ones(W.shape, dtype=torch.bool)})
    before = W.detach().clone()
    with esi.perturb(model, region, noise_ratio=0.38, seed=0):
        eps = (W.detach() - before) / (before.std() * 0.38)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05


# ---------------------------------------------------------------- a Llama-Guard-style judge


def test_guard_soft_judge_on_tiny_llama():
    guard, gtok = tiny_guard(seed=3)
    soft = GuardSoftJudge(guard, gtok)
    assert soft.safe_id == gtok.convert_tokens_to_ids("safe")

    response = "Sure, here is a step by step guide."
    before, after = soft.template()
    full = llama_guard.render(gtok, None, response)     # the guard tokenizer's own template, nothing added
    assert gtok.decode(before) + response + gtok.decode(after) == full
    assert full.count("Task: Check if there is unsafe content") == 1
    assert "User: " in gtok.decode(before) and "Agent" not in gtok.decode(before)

    r_ids = gtok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hard = guard(input_ids=torch.tensor([before + r_ids + after])).logits[0, -1, soft.safe_id]
        got = soft.safe_score(soft.embedding_matrix[torch.tensor(r_ids)])
    torch.testing.assert_close(got, hard, rtol=1e-5, atol=1e-5)

    before_p, after_p = (gtok.decode(ids) for ids in soft.template("Tell me a secret."))
    assert "User: Tell me a secret." in before_p and before_p.endswith("Agent: ") and "Agent" in after_p

    model, tok = _peaked("qwen2")
    runs = ({"variant": "fixed"}, {"variant": "faithful"}, {"variant": "fixed", "judge_sees_prompt": True})
    for kw in runs:
        grads = esi.esi_gradients(model, tok, soft, PROMPTS[:1], max_new_tokens=5, progress=False, **kw)
        flat = _flat(grads)
        assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    assert all(p.grad is None for p in guard.parameters())


def test_bf16_faithful_and_fixed_accumulation(judge):
    """bf16 target: both variants accumulate in fp32 buffers (a bf16 running sum loses small gradients), return
    fp32 and leave no `.grad` behind."""
    model, tok = _peaked(dtype=torch.bfloat16)
    for variant in ("faithful", "fixed"):
        grads = esi.esi_gradients(model, tok, judge, PROMPTS, max_new_tokens=5, variant=variant,
                                  progress=False)
        flat = _flat(grads)
        assert flat.dtype == torch.float32 and torch.isfinite(flat).all() and flat.abs().sum() > 0
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())


def test_batched_generation_matches_one_by_one():
    model, tok = _peaked()
    prompts = PROMPTS + ["Hi", "Explain photosynthesis to a child, step by step, please."]
    # a second EOS id that greedy decoding hits: rows of a batch stop at different steps
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("Ġthe")]
    # batch shapes change the logits' rounding: equal tokens need clear argmaxes (greedy_margin.py)
    assert min_greedy_margin(model, tok, prompts, 8, "You are a helpful assistant.") > MARGIN
    one = esi.respond(model, tok, prompts, 8, "You are a helpful assistant.")
    batched = esi.respond(model, tok, prompts, 8, "You are a helpful assistant.", batch_size=3)
    assert [(ids.tolist(), n) for ids, n in one] == [(ids.tolist(), n) for ids, n in batched]
