import torch
import torch.nn.functional as F

from greedy_margin import MARGIN, min_greedy_margin
from saferegions import chat, cpu_linear, tiny


def test_row_split_linear_is_f_linear(monkeypatch):
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 0)
    torch.manual_seed(0)
    w, b = torch.randn(40, 24), torch.randn(40)
    for shape in [(3, 24), (2, 5, 24), (cpu_linear.MAX_ROWS + 1, 24), (1, 24)]:
        x = torch.randn(shape)
        for bias in (None, b):
            got = cpu_linear.row_split_linear(x, w, bias)
            assert got.shape == F.linear(x, w, bias).shape and got.is_contiguous()
            assert torch.allclose(got, F.linear(x, w, bias), atol=1e-5)


def test_row_split_model_gives_the_same_generations_and_gradients(monkeypatch):
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 0)   # the tiny model's matrices are all small
    model, tok = tiny.tiny_model("qwen2")
    prompts = ["How do I bake bread?", "hi"]
    # the two kernels round differently: equal tokens need clear argmaxes (greedy_margin.py)
    assert min_greedy_margin(model, tok, prompts, 6) > MARGIN
    plain = chat.generate(model, tok, prompts, max_new_tokens=6)
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    cpu_linear.use_row_split(model)
    patched = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert patched and all("forward" in vars(m) for m in patched)
    assert chat.generate(model, tok, prompts, max_new_tokens=6) == plain
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n
