"""SNIP and Wanda throughput against the compute floor, speed-up over the reference per-layer SNIP, peak RSS.

Random-init model with SmolLM2-135M shapes (Llama: 30 layers, hidden 576, FFN 1536, 9/3 heads, vocab 49152,
tied embeddings); calibration = random tokens, `--samples` x `--seq` tokens, the second half of each sample
is the response (labels != -100).

    python bench/bench_snip_wanda.py                        # dtype auto: bf16 if the CPU has bf16 matmul
    python bench/bench_snip_wanda.py --dtype bfloat16 --samples 2 --layers 2

Floor = FLOPs / measured matmul FLOP/s (a 2048^3 matmul in the run dtype; the best of measurements taken
before, between and after the runs, so a busy machine lowers the fractions rather than inflating them), with
  SNIP  6·N·T (forward + backward)   and   Wanda 2·N·T (forward),
N = matmul weights per token (block linear weights + lm_head, counted although tied), T = tokens.
Both implementations skip part of that work (SNIP computes logits only where a response token is predicted
and no lm_head weight gradient; Wanda computes logits for the last position only), so the "exact work"
fraction is also printed: SNIP 6·N_blocks·T + 4·N_head·T_pred, Wanda 2·N_blocks·T.

Reference procedure (Wei et al. `prune_wandg`, faithfully): for each decoder layer, enable grads for that
layer's linear weights only, then forward + backward every sample (batch 1, full-vocab `labels=` loss) and add
|grad| into a buffer of the weight's dtype. Timed on `--layers` layers at the midpoints of equal depth bins
(a layer's cost falls linearly with depth, so the midpoints average it exactly) and scaled to all layers.
Its FLOP count, T·(3L·N_blocks + 4L·N_head + 2·N_blocks) (L full forwards, a backward down to each layer, the
full-vocab head both ways), over ours gives the speed-up the two procedures' arithmetic allows.

Peak RSS is measured in a fresh subprocess (VmHWM reset through /proc/self/clear_refs right before scoring)
and compared with weights + one fp32 score buffer; once with glibc's default malloc and once with
MALLOC_MMAP_THRESHOLD_=65536 (large freed blocks go back to the OS instead of staying in the heap).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import transformers as T

from saferegions.methods.snip import snip_scores
from saferegions.methods.wanda import wanda_scores
from saferegions.models import eligible_weights

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=2048, rope_theta=100000.0)
MiB = 2**20


def cpu_has_bf16_matmul() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def build(dtype: torch.dtype, layers: int | None = None):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**SMOLLM2_135M, **({"num_hidden_layers": layers} if layers else {})})
    return T.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def calibration(samples: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (samples, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def timed(fn, reps: int = 1):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def reference_per_layer(model, batches, layers: list[int]) -> dict[str, torch.Tensor]:
    """Wei et al.'s `prune_wandg`: per layer, grads on for that layer only, every sample re-run."""
    samples = [(b["input_ids"][i:i + 1], b["labels"][i:i + 1])
               for b in batches for i in range(len(b["input_ids"]))]
    flags = {p: p.requires_grad for p in model.parameters()}
    out = {}
    try:
        for layer in layers:
            model.zero_grad()
            model.requires_grad_(False)
            mine = {n: p for n, p in eligible_weights(model).items() if f".layers.{layer}." in n}
            saved = {n: torch.zeros_like(p) for n, p in mine.items()}
            for p in mine.values():
                p.requires_grad_(True)
            for ids, labels in samples:
                model.zero_grad()
                model(input_ids=ids, labels=labels).loss.backward()
                for n, p in mine.items():
                    saved[n] += p.grad.abs()
            for n, p in mine.items():
                out[n] = (p.detach().abs() * saved[n]).float()
            model.zero_grad(set_to_none=True)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return out


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_child(args) -> None:
    """Run in a fresh process: RSS of the runtime, of runtime + model, and the peak while SNIP scores."""
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    runtime = _status_kib("VmRSS")
    model = build(dtype)
    batches = calibration(args.samples, args.seq, SMOLLM2_135M["vocab_size"])
    weights = eligible_weights(model)
    loaded = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                     # reset VmHWM to the current RSS
    scores = snip_scores(model, batches, progress=False)
    peak = _status_kib("VmHWM")
    print(json.dumps({
        "runtime_rss_mib": runtime / 1024, "loaded_rss_mib": loaded / 1024, "peak_rss_mib": peak / 1024,
        "model_bytes_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MiB,
        "score_buffer_mib": sum(p.numel() for p in weights.values()) * 4 / MiB,
        "scores_mib": sum(s.numel() * s.element_size() for s in scores.values()) / MiB}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6, help="layers timed for the reference procedure")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if cpu_has_bf16_matmul() else "float32"
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = build(dtype)
    batches = calibration(args.samples, args.seq, SMOLLM2_135M["vocab_size"])
    weights = eligible_weights(model)
    n_blocks = sum(p.numel() for p in weights.values())
    n_head = model.lm_head.weight.numel()
    n = n_blocks + n_head
    tokens = args.samples * args.seq
    predicted = args.samples * (args.seq // 2)         # positions whose next token is a response token
    floors = [matmul_flops(dtype)]
    total = sum(p.numel() for p in model.parameters())
    print(f"model: SmolLM2-135M shapes, {args.dtype}, {total / 1e6:.1f}M "
          f"params; N = {n_blocks / 1e6:.1f}M block + {n_head / 1e6:.1f}M lm_head; "
          f"{args.samples} samples x {args.seq} tokens; {args.threads} threads")

    snip_scores(model, calibration(1, 32, SMOLLM2_135M["vocab_size"]), progress=False)   # warm-up
    t_snip, s_snip = timed(lambda: snip_scores(model, batches, progress=False))
    floors.append(matmul_flops(dtype))
    t_wanda, _ = timed(lambda: wanda_scores(model, batches, progress=False), reps=2)
    floors.append(matmul_flops(dtype))
    flops_s = max(floors)
    print(f"matmul floor ({args.dtype}, 2048^3): {flops_s / 1e9:.1f} GFLOP/s "
          f"(measurements {', '.join(f'{f / 1e9:.1f}' for f in floors)})")
    flops_snip, exact_snip = 6 * n * tokens, 6 * n_blocks * tokens + 4 * n_head * predicted
    flops_wanda, exact_wanda = 2 * n * tokens, 2 * n_blocks * tokens
    print(f"SNIP : {tokens / t_snip:8.1f} tok/s  {t_snip:7.2f} s  floor fraction "
          f"{flops_snip / flops_s / t_snip:.2f} (6NT)  {exact_snip / flops_s / t_snip:.2f} (exact work)")
    print(f"Wanda: {tokens / t_wanda:8.1f} tok/s  {t_wanda:7.2f} s  floor fraction "
          f"{flops_wanda / flops_s / t_wanda:.2f} (2NT)  {exact_wanda / flops_s / t_wanda:.2f} (exact work)")

    if not args.skip_reference:
        L = model.config.num_hidden_layers
        k = min(args.layers, L)
        layers = [int((i + 0.5) * L / k) for i in range(k)]
        t_ref, s_ref = timed(lambda: reference_per_layer(model, batches, layers))
        t_ref_all = t_ref * L / k
        err = max(((s_ref[m] - s_snip[m]).abs().max() / s_snip[m].abs().max()).item() for m in s_ref)
        flop_ratio = (3 * L * n_blocks + 4 * L * n_head + 2 * n_blocks) * tokens / exact_snip
        print(f"reference per-layer SNIP: {t_ref:.1f} s for layers {layers} -> {t_ref_all:.1f} s for all {L} "
              f"layers; speed-up {t_ref_all / t_snip:.1f}x (FLOP-count ratio {flop_ratio:.1f}x); "
              f"max |ref - ours| / max = {err:.2e}")

    mallocs = [("default malloc", {}), ("MALLOC_MMAP_THRESHOLD_=65536", {"MALLOC_MMAP_THRESHOLD_": "65536"})]
    for label, env in [] if args.skip_memory else mallocs:
        cmd = [sys.executable, __file__, "--memory-child", "--dtype", args.dtype,
               "--samples", str(args.samples), "--seq", str(args.seq), "--threads", str(args.threads)]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
        mem = json.loads(child.stdout.strip().splitlines()[-1])
        floor = mem["model_bytes_mib"] + mem["score_buffer_mib"]
        over = mem["peak_rss_mib"] - mem["runtime_rss_mib"]
        print(f"memory ({label}, fresh process): runtime {mem['runtime_rss_mib']:.0f} MiB, + model "
              f"{mem['loaded_rss_mib']:.0f} MiB, SNIP peak {mem['peak_rss_mib']:.0f} MiB; weights "
              f"{mem['model_bytes_mib']:.0f} + fp32 scores {mem['score_buffer_mib']:.0f} = {floor:.0f} MiB; "
              f"peak - runtime = {over:.0f} MiB ({over / floor:.2f}x weights + scores; the rest is one "
              f"sample's activations and allocator slack)")


if __name__ == "__main__":
    main()
