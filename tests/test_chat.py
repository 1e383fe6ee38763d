import torch

from greedy_margin import MARGIN, min_greedy_margin
from saferegions import chat, tiny

PROMPTS = ["How do I bake bread?", "hi", "Write a poem about the sea, please, right now."]


def test_batched_left_padded_generation_equals_one_by_one():
    model, tok = tiny.tiny_model("qwen2")
    # batch shapes change the logits' rounding: exact token equality needs clear argmaxes (greedy_margin.py)
    assert min_greedy_margin(model, tok, PROMPTS, 6) > MARGIN
    batched = chat.generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [chat.generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert chat.generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2) == batched  # deterministic


def test_render_uses_the_chat_template():
    _, tok = tiny.tiny_model("llama")
    text = chat.render(tok, ["hello"], system="be brief")[0]
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_response_batches_mask_prompt_and_padding():
    _, tok = tiny.tiny_model("llama")
    responses = ["Sure, here is a guide.", "I'm sorry, but I can't assist with that.", "ok"]
    batches = list(chat.response_batches(tok, PROMPTS, responses, batch_size=2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    b = batches[0]
    for j, (p, r) in enumerate(zip(PROMPTS[:2], responses[:2])):
        labels = b["labels"][j]
        kept = labels[labels != -100]
        assert tok.decode(kept) == r + tok.eos_token
        n_prompt = len(tok(chat.render(tok, [p])[0], add_special_tokens=False)["input_ids"])
        real = b["attention_mask"][j].bool()
        assert torch.all(labels[real][:n_prompt] == -100)
        assert torch.all(labels[~real] == -100)


def test_shared_prefix_leaves_each_row_a_token():
    assert chat.shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert chat.shared_prefix([[1, 2], [1, 2]]) == 1
    assert chat.shared_prefix([[7, 1], [8, 1]]) == 0


def _plain_generate(model, tok, prompts, system, n):
    """Reference: HF generate on left-padded inputs, no cache reuse."""
    enc = tok(chat.render(tok, prompts, system), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def test_prefix_cached_generation_equals_plain_left_padded_generation():
    for family in ("qwen2", "llama"):
        model, tok = tiny.tiny_model(family)
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in chat.render(tok, PROMPTS, "Be brief.")]
        assert chat.shared_prefix(rows) > 3   # the system turn is cached once per batch
        assert min_greedy_margin(model, tok, PROMPTS, 6, "Be brief.") > MARGIN, family   # no near-tie to flip
        cached = chat.generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, system="Be brief.")
        assert cached == _plain_generate(model, tok, PROMPTS, "Be brief.", 6)


def test_response_loss_equals_the_models_own_loss_on_padded_batches():
    from saferegions import train
    model, tok = tiny.tiny_model("qwen2")
    responses = ["Sure, here is a guide.", "I'm sorry, but I can't assist with that.", "ok"]
    left = next(chat.response_batches(tok, PROMPTS, responses, batch_size=3))
    right = train.collate(train.encode(tok, PROMPTS, responses, 64, chat_template=True, loss_on_prompt=False),
                          tok.pad_token_id)
    for batch in (left, right):
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        expected = model(**batch, position_ids=positions).loss
        got = chat.response_loss(model, batch["input_ids"], batch["labels"],
                                 attention_mask=batch["attention_mask"], position_ids=positions)
        assert torch.allclose(got, expected, atol=1e-6)
    unlabelled = torch.full_like(left["labels"], -100)
    assert chat.response_loss(model, left["input_ids"], unlabelled) is None


def test_eos_label_only_where_the_model_ended_the_response():
    """A greedy response cut off at max_new_tokens gets no EOS label (the loss would teach stopping
    mid-sentence); one the model ended does, and so does a dataset response (finished=None)."""
    model, tok = tiny.tiny_model("llama")
    cut, _ = chat.generate(model, tok, PROMPTS[:2], max_new_tokens=3, with_finished=True)
    eos = tok.eos_token_id
    force_eos = lambda m, i, out: out.index_fill(-1, torch.tensor([eos]), 1e4)  # noqa: E731
    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        ended, finished_ended = chat.generate(model, tok, PROMPTS[2:], max_new_tokens=3, with_finished=True)
    finally:
        handle.remove()
    _, finished_cut = chat.generate(model, tok, PROMPTS[:2], max_new_tokens=3, with_finished=True)
    assert finished_cut == [False, False] and finished_ended == [True] and ended == [""]
    responses = ["Sure, here is a guide", "I'm sorry, but I can't assist with that."]
    (b,) = chat.response_batches(tok, PROMPTS[:2], responses, batch_size=2, finished=[False, True])
    kept = [row[row != -100] for row in b["labels"]]
    assert tok.decode(kept[0]) == responses[0] and eos not in kept[0].tolist()
    assert tok.decode(kept[1]) == responses[1] + tok.eos_token and kept[1][-1] == eos
    (d,) = chat.response_batches(tok, PROMPTS[:2], responses, batch_size=2)
    assert all(row[row != -100][-1] == eos for row in d["labels"])
