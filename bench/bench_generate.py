"""Greedy generation throughput against the machine's floors: prefill against the fp32 matmul rate, decode against
the roofline of memory bandwidth and matmul rate, at the stages' batch sizes and lengths.

Random-init model with Qwen2.5-0.5B shapes (the embedded default's aligned model: 24 layers, hidden 896, FFN 4864,
14/2 heads, vocab 151936, tied embeddings), fp32 as on CPU; prompts are random tokens of `--prompt` length (a
Qwen chat prompt with its system turn is ~45 tokens). Generation goes through `model.generate` exactly as
`chat.generate` calls it (left-padded batch, KV cache, greedy), with EOS disabled so every row runs to the end.

    python bench/bench_generate.py                       # batches 16 32, 8 and 32 new tokens
    python bench/bench_generate.py --batch 32 --new 8 --layers 4

Floors, with N = matmul weights per token (block linear weights + lm_head) and P = all parameter bytes read once
per decode step (blocks + lm_head; the embedding lookup reads B rows only):
  prefill  2·N_blocks·B·L + 2·N_head·B   FLOPs (logits for the last position only) / matmul FLOP/s
  decode   max(2·N·B FLOPs / matmul FLOP/s,  (P + KV bytes) / copy bandwidth)   per step
Rates are the best of measurements before and after the runs (a busy machine lowers the fractions).
Targets (issue: generation near the floor): prefill >= 0.60, decode >= 0.50 of its floor at batch >= 16.
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers as T

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)


def matmul_flops(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


def copy_bandwidth(nbytes: int = 1 << 28, reps: int = 3) -> float:
    """Bytes moved per second by a large copy (read + write)."""
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / min(_seconds(lambda: dst.copy_(src)) for _ in range(reps))


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build(layers: int | None):
    torch.manual_seed(0)
    cfg = T.Qwen2Config(**{**QWEN25_05B, **({"num_hidden_layers": layers} if layers else {})})
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def weights(model) -> tuple[int, int]:
    """(block matmul weights, lm_head weights)."""
    blocks = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
    return blocks, model.lm_head.weight.numel()


@torch.no_grad()
def timed_generate(model, batch: int, prompt: int, new: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    model.generate(input_ids=ids[:, :4], attention_mask=mask[:, :4], max_new_tokens=2, do_sample=False,
                   pad_token_id=0)   # warm-up
    return _seconds(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                           min_new_tokens=new, do_sample=False, pad_token_id=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--new", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    args = ap.parse_args()

    flops, bandwidth = matmul_flops(), copy_bandwidth()
    model = build(args.layers)
    n_blocks, n_head = weights(model)
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    param_bytes = 4 * (n_blocks + n_head)
    rows = []
    for b in args.batch:
        t1 = timed_generate(model, b, args.prompt, 1)
        for new in args.new:
            tn = timed_generate(model, b, args.prompt, new)
            rows.append((b, new, t1, (tn - t1) / max(new - 1, 1)))
    flops, bandwidth = max(flops, matmul_flops()), max(bandwidth, copy_bandwidth())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul {flops / 1e9:.1f} GFLOP/s, "
          f"copy {bandwidth / 1e9:.1f} GB/s; {cfg.num_hidden_layers} layers, N_blocks {n_blocks / 1e6:.0f} M, "
          f"lm_head {n_head / 1e6:.0f} M")
    print(f"{'batch':>5} {'new':>4} {'prefill tok/s':>13} {'floor':>6} {'decode tok/s':>12} {'floor':>6} "
          f"{'bound':>7} {'decode share':>12}")
    for b, new, t_prefill, t_step in rows:
        prefill_floor = (2 * n_blocks * b * args.prompt + 2 * n_head * b) / flops
        kv = kv_per_token * b * (args.prompt + new / 2)
        compute, memory = 2 * (n_blocks + n_head) * b / flops, (param_bytes + kv) / bandwidth
        step_floor = max(compute, memory)
        decode_share = t_step * (new - 1) / (t_prefill + t_step * (new - 1))
        print(f"{b:>5} {new:>4} {b * args.prompt / t_prefill:>13.0f} {prefill_floor / t_prefill:>6.2f} "
              f"{b / t_step:>12.0f} {step_floor / t_step:>6.2f} {'compute' if compute > memory else 'memory':>7} "
              f"{decode_share:>12.2f}")


if __name__ == "__main__":
    main()
