"""Scores of a bf16 model accumulate in fp32: SNIP's Σ|grad|, Wanda's Σx², ESI's Σ grad.

Each is checked against an fp64 sum of the very contributions the method sees (the same bf16 gradients or
activations), over enough small contributions that a bf16 running sum visibly loses mass: the test also
shows that a bf16 sum of the same contributions misses the reference by far more than the tolerance."""
import torch

from saferegions import chat, tiny
from saferegions.methods import esi
from saferegions.methods.snip import iter_samples, snip_scores
from saferegions.methods.wanda import wanda_scores
from saferegions.models import eligible_weights

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Tell me a story about a fox and a dog."] * 4
RESPONSES = ["Sure, here is a step by step guide.", "I'm sorry, but I can't.", "Once upon a time"] * 4


def _model():
    tok = tiny.tiny_tokenizer()
    model, _ = tiny.tiny_model("llama", tok)
    return model.to(torch.bfloat16), tok


def _gap(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


def _check(scores: dict, fp64: dict, bf16: dict, tol: float = 1e-5) -> None:
    assert all(scores[n].dtype == torch.float32 for n in fp64)
    assert max(_gap(scores[n], fp64[n]) for n in fp64) < tol
    assert max(_gap(bf16[n], fp64[n]) for n in fp64) > 10 * tol   # the setup does lose mass in bf16


def test_snip_accumulates_bf16_gradients_in_fp32():
    model, tok = _model()
    batches = list(chat.response_batches(tok, PROMPTS, RESPONSES, batch_size=4))
    weights = eligible_weights(model)
    fp64 = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in weights.items()}
    bf16 = {n: torch.zeros(p.shape, dtype=torch.bfloat16) for n, p in weights.items()}
    for ids, labels in iter_samples(batches):   # the per-sample bf16 gradients snip_scores sums
        grads = torch.autograd.grad(chat.response_loss(model, ids[None], labels[None]), list(weights.values()))
        for n, g in zip(weights, grads):
            fp64[n] += g.abs().double()
            bf16[n] += g.abs()
    for n, p in weights.items():
        fp64[n] *= p.detach().abs().double()
        bf16[n] *= p.detach().abs()
    _check(snip_scores(model, batches, progress=False), fp64, bf16)


def test_wanda_accumulates_bf16_activations_in_fp32():
    model, tok = _model()
    batches = list(chat.response_batches(tok, PROMPTS, RESPONSES, batch_size=1))
    weights = {n: p for n, p in eligible_weights(model).items() if p.dim() == 2}
    fp64 = {n: torch.zeros(p.shape[-1], dtype=torch.float64) for n, p in weights.items()}
    bf16 = {n: torch.zeros(p.shape[-1], dtype=torch.bfloat16) for n, p in weights.items()}
    rows = iter(batches)
    state = {}

    def capture(name):   # the very inputs wanda_scores' own hooks see, in the same forward passes
        def hook(module, args, output):
            if name == next(iter(weights)):
                state["keep"] = (next(rows)["labels"] != -100).reshape(-1)
            x = args[0].reshape(-1, args[0].shape[-1])[state["keep"]]
            fp64[name] += x.double().pow(2).sum(0)
            bf16[name] += x.pow(2).sum(0)
        return hook
    handles = [model.get_submodule(n.rsplit(".", 1)[0]).register_forward_hook(capture(n)) for n in weights]
    try:
        scores = wanda_scores(model, batches, weights, progress=False)
    finally:
        for h in handles:
            h.remove()
    norm = {n: p.detach().abs().double() * (fp64[n] / len(batches)).sqrt()[None, :] for n, p in weights.items()}
    lost = {n: p.detach().abs() * (bf16[n] / len(batches)).sqrt()[None, :] for n, p in weights.items()}
    _check(scores, norm, lost)


def test_esi_accumulates_bf16_gradients_in_fp32_in_every_variant():
    """'faithful' sums `.grad`s in the model dtype for fp32 models (the reference); a bf16 weight's sum must
    still be fp32: 1 + 1000 × 2⁻¹⁰ is 1 in bf16 (half its ulp at 1 is 2⁻⁸) and ≈ 1.98 in fp32."""
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    parts = [1.0] + [2.0 ** -10] * 1000
    for accum in ("model", "fp32"):
        bf16 = torch.zeros(4, dtype=torch.bfloat16)
        with esi._accumulators({"w": w}, accum) as result:
            for c in parts:
                (w * c).sum().backward()
                bf16 += c
        got = result()["w"]
        assert got.dtype == torch.float32 and w.grad is None
        fp64 = torch.full((4,), sum(parts), dtype=torch.float64)
        _check({"w": got}, {"w": fp64}, {"w": bf16}, tol=1e-6)
