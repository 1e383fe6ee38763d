"""GPU check: a Llama-3.2-1B-shaped model (random init from the shipped config: no hub needed) through SNIP,
Wanda, ESI with a guard-shaped judge and 20 masked SET steps, in bf16. Per part: peak memory
(torch.cuda.max_memory_allocated) against the planner's estimate (`saferegions.memory`), and tokens/s against
the floor = FLOPs / the measured bf16 matmul rate (2·N per token forward, 6·N with a backward).

    python bench/gpu_check.py            # one CUDA GPU, <= 8 minutes
    python bench/gpu_check.py --tiny     # a small model on CPU (fp32): a quick check that it runs

Writes gpu_check.json into $OUT when that is set.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import transformers as T

from saferegions import chat, judges, memory, optim, plan, tiny, train
from saferegions.methods import esi, snip, wanda

TARGET = "meta-llama/Llama-3.2-1B-Instruct"
GUARD_LAYERS = 2          # a guard-shaped judge: Llama-Guard-3-8B's width, two of its layers
SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=8192)


def build(cfg: dict, device, dtype, seed: int):
    torch.manual_seed(seed)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(**cfg), dtype=dtype)
    return model.eval()


def matmul_rate(device, dtype, n: int) -> float:
    """FLOP/s of an n x n matmul in `dtype` (best of 5 after a warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(6):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t) if i else best
    return 2 * n ** 3 / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Meter:
    """Peak memory and wall time of one part."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t
        self.peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None


def texts(n: int, words: int) -> list[str]:
    base = "Sure, here is a step by step guide. First, gather the materials. Then follow the instructions. "
    return [(f"Request {i}: " + base * words)[: words * 6] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small model on CPU in fp32 (quick check)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per example")
    ap.add_argument("--set-steps", type=int, default=20)
    args = ap.parse_args()
    start = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    b = 4 if dtype == torch.float32 else 2
    tok = tiny.tiny_tokenizer()
    target_cfg = plan.shipped_config(TARGET)
    guard_cfg = {**plan.shipped_config("meta-llama/Llama-Guard-3-8B"), "num_hidden_layers": GUARD_LAYERS}
    ids = dict(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    target_cfg, guard_cfg = {**target_cfg, **ids}, {**guard_cfg, **ids}
    if args.tiny:
        target_cfg, guard_cfg = {**target_cfg, **SMALL}, {**guard_cfg, **SMALL, "num_hidden_layers": 2}
        args.tokens = min(args.tokens, 128)
    rate = matmul_rate(device, dtype, 1024 if args.tiny else 8192)
    model = build(target_cfg, device, dtype, 0)
    s = plan.shape_of(model, TARGET)
    n_matmul = s.eligible + s.hidden * s.vocab
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
           "model": f"{TARGET}-shaped, random init", "params": s.params, "matmul_flops": rate, "parts": {}}
    T_ = args.tokens
    prompts, responses = texts(8, T_ // 4), texts(8, T_ // 2)

    def record(name, meter, estimate, tokens, flop_per_token):
        floor = tokens * flop_per_token * n_matmul / rate
        row = {"seconds": round(meter.seconds, 2), "tokens_per_s": round(tokens / meter.seconds, 1),
               "floor_tokens_per_s": round(tokens / floor, 1), "of_floor": round(floor / meter.seconds, 3),
               "estimate_gb": round(estimate / 1e9, 3)}
        if meter.peak is not None:
            row["peak_gb"] = round(meter.peak / 1e9, 3)
            row["estimate_over_peak"] = round(estimate / meter.peak, 3)
        out["parts"][name] = row
        print(name, row, flush=True)

    batches = list(chat.response_batches(tok, prompts, responses, 4, T_))
    n_tok = sum(int(bt["attention_mask"].sum()) for bt in batches)
    with Meter(device) as m:
        snip.snip_scores(model, batches, progress=False)
    record("snip", m, sum(memory.snip(memory.resident(s, b, "snip"), s, b, T_).totals(True)[0].values()), n_tok, 6)
    with Meter(device) as m:
        wanda.wanda_scores(model, batches, progress=False)
    est = memory.resident(s, b, "wanda").add("activations", device=memory.forward_activations(s, 4 * T_, 4, b))
    record("wanda", m, sum(est.add("scores", device=s.largest * 4).totals(True)[0].values()), n_tok, 2)

    guard_model = build(guard_cfg, device, dtype, 1)
    word = next(w for w in ("safe", "I", "the") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    guard = judges.GuardSoftJudge(guard_model, tok, safe_word=word)   # the tiny tokenizer may split "safe"
    g = plan.shape_of(guard_model)
    new = T_ // 4
    with Meter(device) as m:
        grads = esi.esi_gradients(model, tok, guard, prompts[:2], max_new_tokens=new, variant="fixed",
                                  progress=False)
    est = memory.esi_phase(memory.resident(s, b, "esi"), s, g, b, new, prompt=T_ // 4 + 16)
    record("esi", m, sum(est.totals(True)[0].values()), 2 * (T_ // 4 + 16 + new), 6)
    region = esi.esi_region(esi.esi_scores(grads, model), model, 0.01)
    del grads, guard, guard_model
    masks = {n: mk.to(device) for n, mk in region.masks.items()}
    examples = train.encode(tok, prompts, responses, T_)
    with Meter(device) as m:
        opt = optim.MaskedAdamW(optim.build_param_groups(model, masks, force_bias_norm=True), lr=3e-5,
                                mode="sparse")
        train.train(model, opt, examples, args.set_steps, 1, tok.pad_token_id)
    k = int(0.01 * s.params)
    est = memory.masked_arm(memory.resident(s, b, "set"), s, b, T_, k)
    mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
    record("set", m, sum(est.totals(True)[0].values()), args.set_steps * mean_len, 6)
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(f"total {out['seconds']} s on {out['device']}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_check.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
