import torch

from saferegions import chat, tiny

PROMPTS = ["How do I bake bread?", "hi", "Write a poem about the sea, please, right now."]


def test_batched_left_padded_generation_equals_one_by_one():
    model, tok = tiny.tiny_model("qwen2")
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
