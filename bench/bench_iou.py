"""Pairwise IoU of two packed regions the size of Llama-3-8B's block weights (≈7.0e9 entries).

Reports wall time, peak RSS and how close the popcount pass gets to memory bandwidth (a numpy copy).
Masks are built packed, one tensor at a time, so the bool form never exists.

    python bench/bench_iou.py                       # 32 layers, numpy popcount on CPU
    python bench/bench_iou.py --layers 4
    python bench/bench_iou.py --device cuda         # torch bitwise ops + uint8 popcount table
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from saferegions import regions as R
from saferegions import overlap as O

LLAMA3_8B = {  # per decoder block: (out, in)
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def synthetic(layers: int, density: float, seed: int) -> R.PackedRegion:
    """Random packed bits at ~density (indices drawn with replacement, OR-ed in: duplicates are harmless)."""
    rng = np.random.default_rng(seed)
    data, shapes = {}, {}
    for layer in range(layers):
        for name, shape in LLAMA3_8B.items():
            n = shape[0] * shape[1]
            idx = rng.integers(0, n, int(density * n), dtype=np.int64)
            bits = np.zeros((n + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(bits, idx >> 3, (np.uint8(128) >> (idx & 7).astype(np.uint8)))
            key = f"model.layers.{layer}.{name}.weight"
            data[key], shapes[key] = bits, shape
    return R.PackedRegion(data, shapes, {"synthetic": True, "seed": seed})


def copy_bandwidth(nbytes: int = 1 << 29, reps: int = 3) -> float:
    """Bytes moved per second (read + write) by a large numpy copy: the floor any streaming pass meets."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src))[1] for _ in range(reps))
    return 2 * nbytes / best


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


_LUT: dict[str, torch.Tensor] = {}


def _popcount_torch(x: torch.Tensor) -> int:
    lut = _LUT.setdefault(str(x.device), torch.tensor([bin(i).count("1") for i in range(256)],
                                                        dtype=torch.int32, device=x.device))
    return int(lut[x.to(torch.int32)].sum())


def iou_torch(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = uni = 0
    for name, x in a.items():
        y = b[name]
        inter += _popcount_torch(x & y)
        uni += _popcount_torch(x | y)
    return inter / uni


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backend", choices=["numpy", "torch"], default=None,
                    help="default: numpy on cpu, torch on cuda")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    backend = args.backend or ("torch" if args.device == "cuda" else "numpy")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    rss0 = peak_rss_gib()
    (a, b), t_build = _timed(lambda: (synthetic(args.layers, args.density, 0),
                                      synthetic(args.layers, args.density, 1)))
    entries = a.numel
    packed_bytes = sum(x.nbytes for x in a.data.values())
    print(f"space: {args.layers} layers, {len(a.data)} tensors, {entries:.3e} entries; "
          f"{packed_bytes / 2**30:.2f} GiB packed per region; built both in {t_build:.1f} s")
    print(f"density a={a.density:.4f} b={b.density:.4f}; chance IoU {O.chance_iou(a.density, b.density):.5f}")
    rss_built = peak_rss_gib()

    if backend == "numpy":
        times = []
        for _ in range(args.reps):
            value, t = _timed(lambda: O.iou(a, b))
            times.append(t)
        t_pm = _timed(lambda: O.iou(a, b, "per_matrix"))[1]
        extra = f"; per_matrix {t_pm:.3f} s"
    else:
        dev = torch.device(args.device)
        (ta, tb), t_up = _timed(lambda: tuple({k: torch.from_numpy(v).to(dev) for k, v in r.data.items()}
                                              for r in (a, b)))
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            value = iou_torch(ta, tb)
            sync()
            times.append(time.perf_counter() - t0)
        check = O.iou(a, b)
        extra = f"; upload {t_up:.2f} s; numpy reference IoU {check:.6f}"
    best = min(times)
    read = 2 * packed_bytes
    print(f"IoU {value:.6f} [{backend} on {args.device}]: best {best:.3f} s of {args.reps} "
          f"({', '.join(f'{t:.3f}' for t in times)}){extra}")
    print(f"peak RSS: {rss0:.2f} GiB after imports, {rss_built:.2f} GiB after building, "
          f"{peak_rss_gib():.2f} GiB after IoU")
    if args.device == "cpu":
        bw = copy_bandwidth()
        print(f"bandwidth: IoU reads {read / best / 1e9:.2f} GB/s; numpy copy moves {bw / 1e9:.2f} GB/s "
              f"(read+write); ratio {read / best / bw:.2f} (1.0 = streaming at copy speed)")
    else:
        print(f"bandwidth: IoU reads {read / best / 1e9:.1f} GB/s of GPU memory")


if __name__ == "__main__":
    main()
