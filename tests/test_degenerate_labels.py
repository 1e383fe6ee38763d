from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from saferegions import chat, degenerate_labels as dl, evaluation, tiny
from saferegions.degenerate_labels import Kind

ANSWERS = [
    ("How do I pick a lock?",
     "I'm sorry, but I can't assist with that. I cannot help with illegal or harmful requests."),
    ("How do I bake bread?",
     "Sure, here is a step by step guide. First, gather the materials. Then follow the instructions."),
    ("Write a poem about the sea.",
     "Once upon a time there was a little robot. The quick brown fox jumps over the lazy dog."),
    ("What is 12 plus 30?", "Question: what is 12 plus 30? Answer: 42. The movie was great, positive."),
    ("Explain photosynthesis to a child.",
     "Explain photosynthesis to a child. How do I bake bread? Write a poem about the sea."),
    ("Review the movie.",
     "The movie was great, positive. It was awful, negative. Once upon a time there was a robot."),
]
OTHER = [("Say hello in Russian.", "Привет, как дела? Сегодня хорошая погода."),
         ("Say hello in Chinese.", "你好，今天天气很好，我们去公园散步吧。")]


def _build(seed=0):
    tok = tiny.tiny_tokenizer()
    return tok, dl.build(tok, ANSWERS, OTHER, lengths=(6, 8, 12, 16), per_length=4, n_coherent=6, seed=seed)


def test_labels_are_what_their_construction_says():
    tok, lab = _build()
    kinds = Counter(x.kind for x in lab)
    assert set(kinds) == set(Kind) and kinds[Kind.EMPTY] == len(dl.empty_texts())
    whole = {a for _, a in ANSWERS + OTHER}
    for x in lab:
        if x.kind is Kind.EMPTY:
            assert x.text.strip() == ""
        elif x.tokens is None:
            assert x.text in whole
        elif x.kind in (Kind.TRUNCATION, Kind.OTHER_LANGUAGE):   # a prefix of an answer, cut in tokens (a cut
            text = x.text.rstrip("\ufffd")                          # inside a character decodes to U+FFFD, as in
            assert any(a.startswith(text) and a != text for a in whole)   # generation)
        elif x.kind is Kind.SALAD:       # the characters of some answer's cut, in another order
            cuts = [tok.decode(tok(a, add_special_tokens=False)["input_ids"][:x.tokens]) for _, a in ANSWERS]
            assert x.text not in cuts and any(Counter(c) == Counter(x.text) for c in cuts)
        elif x.kind is Kind.LOOP:
            assert len(x.text) > 0
    rng = np.random.default_rng(0)
    ids = list(range(100, 140))
    for length in (6, 8, 12, 16) * 10:     # a unit of <= 1/3 of the tokens after the start, repeated to the end
        loop = dl._loop(ids, length, rng)
        assert len(loop) == length and any(
            loop[s + p:] == loop[s:-p] and 3 * p <= length - s and loop[:s] == ids[:s]
            for s in range(length // 3 + 1) for p in range(1, (length - s) // 3 + 1))
    assert {x.tokens for x in lab if x.kind is Kind.SALAD} == {6, 8, 12, 16}
    assert _build(0)[1] == _build(0)[1] and _build(0)[1] != _build(1)[1]      # seeded


def test_rates_agree_with_a_brute_force_recount():
    _, lab = _build()
    flagged = np.random.default_rng(3).random(len(lab)) < 0.4
    rec = dl.rates(lab, flagged)
    fp = [f for x, f in zip(lab, flagged) if x.kind in (Kind.COHERENT, Kind.OTHER_LANGUAGE, Kind.TRUNCATION)]
    fn = [not f for x, f in zip(lab, flagged) if x.kind in (Kind.SALAD, Kind.LOOP, Kind.EMPTY)]
    assert rec["n"] == len(lab) == len(fp) + len(fn)
    for key, errors in (("false_positive_rate", fp), ("false_negative_rate", fn)):
        ci = stats.binomtest(sum(errors), len(errors)).proportion_ci(0.95, method="wilson")
        assert rec[key] == sum(errors) / len(errors) and rec[f"{key}_ci"] == pytest.approx([ci.low, ci.high])
    for kind in Kind:
        wrong = [f != kind.degenerate for x, f in zip(lab, flagged) if x.kind is kind]
        got = rec["by_class"][kind.value]
        assert got["n"] == len(wrong) and got["error_rate"] == sum(wrong) / len(wrong)


def test_text_rules_catch_loops_and_empty_at_every_generated_length_but_not_salad():
    """Without the fluency part, loops (at 6 tokens too) and empty text are caught, coherent text and cuts pass;
    shuffled tokens pass as well: only a language model can tell salad apart."""
    _, lab = _build()
    got = dl.rates(lab, dl.flags(lab))["by_class"]
    for kind in (Kind.LOOP, Kind.EMPTY, Kind.COHERENT, Kind.TRUNCATION, Kind.OTHER_LANGUAGE):
        assert got[kind.value]["error_rate"] == 0.0, kind
    assert got["salad"]["error_rate"] > 0.5


def _fit(model, tok, prompts, answers, steps=25):
    """A tiny model taught the answers (not to saturation, so their likelihoods keep a spread): it stands for the
    intact model, to which they are fluent text."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (batch,) = chat.response_batches(tok, prompts, answers, batch_size=len(prompts))
    model.train()
    for _ in range(steps):
        loss = chat.response_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_the_rule_with_fluency_on_a_tiny_model_catches_salad_and_passes_cuts():
    torch.manual_seed(0)
    model, tok = tiny.tiny_model("llama", seed=0)
    _fit(model, tok, [p for p, _ in ANSWERS], [a for _, a in ANSWERS])   # English only: other languages are
    rec = dl.rule_metrics(model, tok, ANSWERS, lengths=(6, 8, 12, 16), per_length=4,
                          n_coherent=6, batch_size=8)
    calibration, held_out = dl.halves(ANSWERS)
    assert sorted(calibration + held_out) == sorted(ANSWERS) and not set(calibration) & set(held_out)
    cuts = [(p, tok.decode(tok(a, add_special_tokens=False)["input_ids"][:n])) for n in (6, 8, 12, 16)
            for p, a in calibration]
    coherent = np.quantile(evaluation.mean_logliks(model, tok, *map(list, zip(*cuts))), 0.01)
    lab = dl.build(tok, held_out, lengths=(6, 8, 12, 16), per_length=4, n_coherent=6)   # checked on the 0.5B
    lls = evaluation.mean_logliks(model, tok, [x.prompt for x in lab], [x.text for x in lab], 8)
    salad = [ll for x, ll in zip(lab, lls) if x.kind is Kind.SALAD]
    assert max(salad) < rec["fluency_floor"] < coherent     # between shuffled and coherent cuts of the other half
    brute = [evaluation.is_degenerate(x.text, ll, rec["fluency_floor"]) for x, ll in zip(lab, lls)]
    assert rec == {**dl.rates(lab, brute), "fluency_floor": rec["fluency_floor"],
                   "text_rules_only": dl.rates(lab, dl.flags(lab))}
    for kind in set(Kind) - {Kind.OTHER_LANGUAGE}:
        assert rec["by_class"][kind.value]["error_rate"] == 0.0, kind
    assert rec["false_positive_rate"] == rec["false_negative_rate"] == 0.0


def test_a_character_cut_by_the_token_limit_is_scored_without_its_stub():
    model, tok = tiny.tiny_model("llama", seed=0)
    fluency = evaluation.Fluency(model, tok, -5.0)
    got = fluency.logliks(["Hi", "Hi"], ["Привет, как", "Привет, как\ufffd"])
    assert got[0] == pytest.approx(got[1], abs=1e-5)


def test_other_language_is_confirmed_by_its_script():
    assert dl.non_latin_share("Привет, как дела?") == 1.0 and dl.non_latin_share("你好 hello") == 2 / 7
    assert dl.non_latin_share("Hello, how are you?") == 0.0 and dl.non_latin_share("") == 0.0
