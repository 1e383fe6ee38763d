"""Beyond one GPU with PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`, launched by `torchrun`).

- `process_group()`: joins the group torchrun set up (gloo on CPU, nccl on CUDA) and leaves it on exit.
- `shard(model)`: `fully_shard` on every decoder block, then on the root (torchtitan's recipe). Every parameter
  becomes a DTensor sharded on dim 0: rank r holds the r-th `torch.chunk` of the rows, so within a tensor the
  ranks' local shards follow the flat order rank by rank (what the sharded top-k's tie rule relies on).
- `local(t)`: the local shard of a DTensor (a view: writing into it writes the parameter), any other tensor as is.
- `on_main(path)`: an atomic write that only rank 0 performs; every rank waits for it.
- `gather_packed(region, shapes)`: the whole region on rank 0 from the ranks' packed mask bits.
- `relaunch(target, nproc, args)`: runs "module:function" under `torchrun --nproc-per-node N` in a subprocess,
  so a stage re-launches its own work and `dvc repro` stays the one command.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from .io import atomic_path

MODES = ("none", "fsdp")


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its GPU under nccl (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def process_group():
    """Inside: the process group torchrun's environment describes (gloo on CPU, nccl on CUDA), destroyed on exit.
    A group that already exists is used and left alone."""
    if dist.is_initialized():
        yield
        return
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where tensors must be for a collective of the current backend."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` summed (or `op`) over ranks, on t's device; unchanged outside a process group."""
    if not active():
        return t
    x = t.to(comm_device())
    dist.all_reduce(x, op=op)
    return x.to(t.device)


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """[world_size, *t.shape]: every rank's `t` (same shape on every rank), in rank order."""
    if not active():
        return t[None]
    x = t.to(comm_device())
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.stack(out).to(t.device)


def every_rank(flag: bool, collective: bool = True) -> bool:
    """True when `flag` holds on every rank (a collective only where `collective` and a group is active)."""
    if not collective or not active():
        return flag
    return bool(all_reduce(torch.tensor(int(flag)), dist.ReduceOp.MIN))


def shard(model, reshard_after_forward: bool = True):
    """`model` with FSDP2 applied in place: each decoder block is one communication unit, the root (embeddings,
    final norm, lm_head) another. Parameters stay sharded between forwards, so in-place edits of `local(p)`
    (ablation, optimizer steps) take effect at the next forward."""
    from torch.distributed.fsdp import fully_shard

    from .models import block_modules
    for block in block_modules(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def sharded(model) -> bool:
    """True for a model with FSDP2-sharded parameters (`shard`)."""
    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of the parameter's storage), any other tensor unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


def row_offset(p: torch.Tensor) -> int:
    """First dim-0 index of this rank's shard of `p` (0 for a plain tensor): `torch.chunk` placement."""
    if not isinstance(p, DTensor):
        return 0
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"expected a dim-0 sharded DTensor, got placements {p.placements}")
    n, w = p.shape[0], p.device_mesh.size()
    return min(p.device_mesh.get_local_rank() * math.ceil(n / w), n)


def gather_packed(region, shapes: dict[str, tuple[int, ...]]):
    """On rank 0, the whole region (a `regions.PackedRegion`, 'auto' encoding) of a Region of local shards (each
    mask the dim-0 chunk `shard` gives this rank of a tensor shaped `shapes[name]`), assembled one tensor at a time
    from every rank's packed bits; None on the other ranks. No rank sends its bool masks or any scores."""
    from .regions import PackedRegion, pack
    w, data = world_size(), {}
    for name, m in region.masks.items():
        n_rows, row = shapes[name][0], math.prod(shapes[name][1:])
        chunk = math.ceil(n_rows / w)
        counts = [(min((r + 1) * chunk, n_rows) - min(r * chunk, n_rows)) * row for r in range(w)]
        if m.numel() != counts[rank()]:
            raise ValueError(f"{name}: a local mask of {m.numel()} entries, expected {counts[rank()]}")
        buf = torch.zeros((max(counts) + 7) // 8, dtype=torch.uint8)
        bits = np.packbits(m.reshape(-1).numpy())
        buf[:bits.size] = torch.from_numpy(bits)
        every = all_gather(buf).numpy()
        if is_main():
            data[name] = np.packbits(np.concatenate([np.unpackbits(b, count=c) for b, c in zip(every, counts)]))
    if not is_main():
        return None
    return pack(PackedRegion(data, {n: tuple(shapes[n]) for n in data}, region.meta, region.units), "auto")


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def on_main(path: str | Path):
    """Yield a temporary path on rank 0 (renamed onto `path` when the block succeeds) and None on the other
    ranks, which write nothing; every rank leaves after the file exists."""
    try:
        if is_main():
            with atomic_path(path) as tmp:
                yield tmp
        else:
            yield None
    finally:
        barrier()


def relaunch(target: str, nproc: int, args: list[str] = (), env: dict | None = None,
             timeout: float | None = None) -> None:
    """Run `target` ("module:function", called with `args` as strings) on `nproc` ranks under torchrun, each
    inside `process_group()`. Raises CalledProcessError when any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", __name__, target, *map(str, args)]
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    """Entry point of each rank `relaunch` starts."""
    target, *args = sys.argv[1:] if argv is None else argv
    module, _, attr = target.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    with process_group():
        fn(*args)


if __name__ == "__main__":
    main()
