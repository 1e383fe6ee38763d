"""Optimizer-state memory and step time of MaskedAdamW: dense ("faithful") vs sparse state.

1. Analytic, Llama-3-8B shapes (32 layers, hidden 4096, FFN 14336, 32/8 heads, vocab 128256, untied),
   a 1% mask on every weight matrix (SET) and its inverse (SPA), fp32 moments, int64 vs int32 indices,
   norms always trainable (force_bias_norm). Uses the optimizer's own per-tensor layout rule. For bf16
   weights the state also holds an fp32 master per trainable entry (12 bytes + index), always in the
   sparse layout; the table then adds the accelerator total of a training step: bf16 weights + bf16
   gradients (all of them: the global grad-norm clip reads every gradient) + optimizer state.
2. Measured on a random-init Llama (default hidden 512, 4 layers, vocab 8192): `state_bytes` after one step
   and median time of `optimizer.step()` (random gradients, backward excluded).

Usage: python bench/bench_optimizer_memory.py [--device cpu|cuda] [--dtype fp32|bf16] [--steps 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers as T

from saferegions.optim import MaskedAdamW, build_param_groups, invert_masks, state_bytes

GB = 1e9


def llama_shapes(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256):
    """(name, shape) of every parameter of an untied Llama."""
    hd = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        b = f"model.layers.{i}."
        out += [(b + "self_attn.q_proj.weight", (heads * hd, hidden)),
                (b + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
                (b + "self_attn.v_proj.weight", (kv_heads * hd, hidden)),
                (b + "self_attn.o_proj.weight", (hidden, heads * hd)),
                (b + "mlp.gate_proj.weight", (ffn, hidden)),
                (b + "mlp.up_proj.weight", (ffn, hidden)),
                (b + "mlp.down_proj.weight", (hidden, ffn)),
                (b + "input_layernorm.weight", (hidden,)),
                (b + "post_attention_layernorm.weight", (hidden,))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def analytic_bytes(shapes, density, idx_bytes, sparse, per_entry=8):
    """State bytes with fp32 m, v (`per_entry` 8; 12 with bf16 weights' fp32 masters): per matrix an index
    layout when it is smaller (sparse mode), else dense."""
    total = 0
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        if "norm" in name or len(shape) == 1:  # force_bias_norm: fully trainable, dense state
            total += per_entry * n
            continue
        k = round(n * density)
        sparse_cheaper = k * (per_entry + idx_bytes) < per_entry * n
        total += (per_entry + idx_bytes) * k if sparse and sparse_cheaper else per_entry * n
    return total


def random_region(model, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) < frac).to(p.device)
            for n, p in model.named_parameters() if p.ndim == 2}


def measure(model, masks, spa, mode, steps, index_dtype=torch.int64):
    """state_bytes after one step and mean step time; restores the weights afterwards."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    if masks is None:
        pairs = [(p, None) for p in model.parameters()]
    elif spa:
        pairs = build_param_groups(model, invert_masks(masks), train_outside_mask=True)
    else:
        pairs = build_param_groups(model, masks)
    if mode == "torch":
        opt = torch.optim.AdamW([p for p, _ in pairs], lr=1e-5, weight_decay=0.01)
    else:
        opt = MaskedAdamW(pairs, lr=1e-5, mode=mode, index_dtype=index_dtype)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for p, _ in pairs:
        p.grad = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    opt.step()
    nbytes = state_bytes(opt)
    for _ in range(2):
        opt.step()
    times = []
    for _ in range(steps):  # median of single steps: robust to other processes sharing the CPU
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    trainable = sum(p.numel() if m is None else int(m.sum()) for p, m in pairs)
    del opt, pairs
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
            p.grad = None
    return nbytes, dt, trainable


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights of the measured model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--frac", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = default); 1 avoids OpenMP spin-waits on a busy shared CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    f = args.frac

    shapes = llama_shapes()
    n = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"## Analytic: Llama-3-8B shapes, {n / 1e9:.3f}B params, mask {f:.0%} per weight matrix, "
          "fp32 moments")
    print(f"{'scenario':<34}{'dense GB':>10}{'sparse i64':>12}{'sparse i32':>12}"
          f"{'i64/dense':>11}{'i32/dense':>11}")
    for label, dens in [(f"SET (train {f:.0%})", f), (f"SPA (freeze {f:.0%}, train {1 - f:.0%})", 1 - f)]:
        d = analytic_bytes(shapes, dens, 8, sparse=False)
        s64 = analytic_bytes(shapes, dens, 8, sparse=True)
        s32 = analytic_bytes(shapes, dens, 4, sparse=True)
        print(f"{label:<34}{d / GB:>10.2f}{s64 / GB:>12.2f}{s32 / GB:>12.2f}{s64 / d:>11.4f}{s32 / d:>11.4f}")
    print(f"(reference under --bf16 keeps bf16 moments: {4 * n / GB:.2f} GB; bf16 weights themselves: "
          f"{2 * n / GB:.2f} GB)")
    print("\n## Analytic, bf16 weights: fp32 master + m + v per trainable entry (int64 index where cheaper)")
    print(f"{'scenario':<34}{'state GB':>10}{'+ weights + grads GB':>22}")
    for label, dens in [(f"SET (train {f:.0%})", f), (f"SPA (freeze {f:.0%}, train {1 - f:.0%})", 1 - f),
                        ("full FT", 1.0)]:
        st = analytic_bytes(shapes, dens, 8, sparse=True, per_entry=12)
        print(f"{label:<34}{st / GB:>10.2f}{(st + 4 * n) / GB:>22.2f}")

    cfg = T.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                        intermediate_size=int(args.hidden * 3.5),
                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).to(args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    n_small = sum(p.numel() for p in model.parameters())
    masks = random_region(model, f)
    print(f"\n## Measured: random Llama hidden {args.hidden}, {args.layers} layers, "
          f"FFN {cfg.intermediate_size}, vocab {args.vocab} ({n_small / 1e6:.1f}M params), "
          f"{args.dtype} weights, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} optimizer steps")
    print(f"{'scenario':<14}{'optimizer':<24}{'trainable':>12}{'state MB':>10}{'ratio':>8}{'ms/step':>9}")
    rows = [("full FT", None, False, [("torch.optim.AdamW", "torch", torch.int64),
                                      ("MaskedAdamW", "faithful", torch.int64)]),
            (f"SET {f:.0%}", masks, False, [("faithful (dense)", "faithful", torch.int64),
                                          ("sparse int64", "sparse", torch.int64),
                                          ("sparse int32", "sparse", torch.int32)]),
            (f"SPA {f:.0%}", masks, True, [("faithful (dense)", "faithful", torch.int64),
                                         ("sparse (falls back)", "sparse", torch.int64)])]
    for label, m, spa, opts in rows:
        base = None
        for name, mode, idt in opts:
            b, dt, k = measure(model, m, spa, mode, args.steps, idt)
            base = base or b
            print(f"{label:<14}{name:<24}{k:>12,}{b / 1e6:>10.2f}{b / base:>8.4f}{dt * 1e3:>9.2f}")


if __name__ == "__main__":
    main()
