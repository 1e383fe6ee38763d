"""Few-row linear layers on CPU: F.linear (x @ Wᵀ) against cpu_linear.row_split_linear ((W @ xᵀ)ᵀ).

The shapes are Qwen2.5-0.5B's projections and its untied lm_head; rows = tokens in the call (a decode step has
one per sequence). Prints each layout's share of the compute floor (FLOPs at the large-GEMM rate measured here)
and the speed-up, then one 16-row decode step of all 24 blocks + lm_head.

    python bench/bench_cpu_linear.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from saferegions.cpu_linear import row_split_linear

QWEN_05B = {"q/o_proj": (896, 896), "k/v_proj": (128, 896), "gate/up_proj": (4864, 896),
            "down_proj": (896, 4864), "lm_head": (151936, 896)}
PER_BLOCK = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}


def seconds(fn, repeat: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def peak_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / seconds(lambda: a @ b, 5) / 1e9


def main() -> None:
    peak = peak_gflops()
    print(f"threads {torch.get_num_threads()}, large-GEMM rate {peak:.1f} GFLOP/s (the floor below)")
    print(f"{'layer':>13} {'rows':>5} {'F.linear':>10} {'row split':>10} {'floor share':>18} {'speed-up':>9}")
    step = {"F.linear": 0.0, "row split": 0.0}
    for name, (out, inp) in QWEN_05B.items():
        w = torch.randn(out, inp)
        for rows in (1, 16, 64, 128, 256):
            x = torch.randn(rows, inp)
            floor = 2 * rows * out * inp / peak / 1e9
            a, b = seconds(lambda: F.linear(x, w)), seconds(lambda: row_split_linear(x, w))
            print(f"{name:>13} {rows:5d} {a * 1e3:8.2f}ms {b * 1e3:8.2f}ms {floor / a:8.2f} → {floor / b:6.2f} "
                  f"{a / b:8.2f}×")
            if rows == 16:
                times = 24 * PER_BLOCK.get(name, 0) or 1
                step["F.linear"] += times * a
                step["row split"] += times * b
    print(f"16-row decode step, linears only: F.linear {step['F.linear']:.3f} s, row split "
          f"{step['row split']:.3f} s ({step['F.linear'] / step['row split']:.2f}×)")


if __name__ == "__main__":
    main()
