"""Training checkpoints, so a killed SET / SPA arm resumes where it stopped and ends as an uninterrupted run.

A checkpoint is a directory, replaced atomically: `tensors.safetensors` holds what the run changes (the
optimizer's tensors, the values of every entry it trains — read back from the fp32 masters where the
optimizer keeps them — and the RNG states), `counters.json` the step, the loss curve so far, the optimizer's
scalar state and the run's key. The data order and the learning-rate schedule are functions of the step, so
they are replayed, not stored. A checkpoint whose key differs (another arm, recipe, data, mask or model) is
ignored and overwritten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import optim
from .io import atomic_dir

TENSORS, COUNTERS = "tensors.safetensors", "counters.json"


def run_key(arm: str, cfg, seed: int, examples, masks: dict[str, torch.Tensor] | None, model) -> dict:
    """What makes two runs the same: arm, recipe, seed, the examples' tokens, the mask and the initial weights
    (their fp64 sum, a fingerprint that any change of weights alters in practice)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(np.asarray(e.input_ids + [-1] + e.labels, dtype=np.int64).tobytes())
    mask_digest = hashlib.sha256()
    for name in sorted(masks or {}):
        mask_digest.update(name.encode())
        mask_digest.update(np.packbits(masks[name].detach().cpu().numpy().astype(bool)).tobytes())
    weights = sum(float(torch.sum(p.detach(), dtype=torch.float64)) for p in model.parameters())
    recipe = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    return _json({"arm": arm, "recipe": recipe, "seed": seed, "examples": digest.hexdigest(),
                  "masks": mask_digest.hexdigest(), "weights": weights})


def _json(obj):
    return json.loads(json.dumps(obj, default=str))


def _index(optimizer, p):
    return optimizer.index(p) if isinstance(optimizer, optim.MaskedAdamW) else None


@torch.no_grad()
def save(path: Path, key: dict, step: int, curve: list[dict], params: list, optimizer) -> None:
    """Checkpoint after `step` optimizer steps (`params` in the optimizer's order)."""
    tensors, scalars = {}, {}
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(i), {})[k] = v
    for i, p in enumerate(params):
        if "master" in optimizer.state.get(p, {}):
            continue   # the param is its master's rounding
        idx = _index(optimizer, p)
        values = p.reshape(-1).index_select(0, idx) if idx is not None else p.detach()
        tensors[f"param.{i}"] = values.to("cpu").contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{d}"] = s
    with atomic_dir(path) as tmp:
        save_file(tensors, tmp / TENSORS)
        (tmp / COUNTERS).write_text(json.dumps({"key": _json(key), "step": step, "curve": curve,
                                                "scalars": scalars}))


@torch.no_grad()
def load(path: Path, key: dict, params: list, optimizer) -> tuple[int, list[dict]] | None:
    """Restore a checkpoint of this run into `params` and `optimizer`: (step, curve), or None if there is none."""
    path = Path(path)
    if not (path / COUNTERS).exists():
        return None
    counters = json.loads((path / COUNTERS).read_text())
    if counters["key"] != _json(key):
        print(f"ignoring the checkpoint in {path}: it is of another run")
        return None
    tensors = load_file(path / TENSORS)
    state = {int(i): dict(s) for i, s in counters["scalars"].items()}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    for i, p in enumerate(params):
        idx = _index(optimizer, p)
        values = tensors.get(f"param.{i}")
        if values is None:
            values = optimizer.state[p]["master"].to(p.dtype)
        if idx is not None:
            p.view(-1).index_put_((idx,), values.to(p.device))
        else:
            p.copy_(values)
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    print(f"resuming from {path} after step {counters['step']}")
    return counters["step"], counters["curve"]


def fast_forward(scheduler, stream, steps: int, grad_accum: int) -> None:
    """Replay `steps` steps of the schedule and the data stream (both are functions of the step)."""
    for _ in range(steps * grad_accum):
        next(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
