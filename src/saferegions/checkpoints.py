"""Resume points of the long non-training stages: the finished units of identify (one per dataset) and ESI's running
gradient sums, so a killed stage re-run skips what it had finished and ends as an uninterrupted run.

A `Checkpoints` folder holds `key.json` (what makes two runs the same: model, method or objective, params and
data) and one atomically written sub-folder per unit: `value.json` plus `tensors.safetensors` and one region file
per Region in the value. A folder whose key differs is of another run: it is removed and started afresh. Values are
JSON trees whose leaves may be tensors and Regions; tuples and dicts with non-string keys come back as they were.
Training arms resume with `resume.py`.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import regions
from .io import atomic_dir, atomic_path
from .regions import Region

KEY, VALUE, TENSORS = "key.json", "value.json", "tensors.safetensors"


def digest(*items) -> str:
    """sha256 of JSON-able items (strings, numbers, lists, dicts) and of the bytes of files given as Paths."""
    h = hashlib.sha256()
    for item in items:
        h.update(Path(item).read_bytes() if isinstance(item, Path) else
                 json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_identity(model) -> dict:
    """The model's name or path and the fp64 sum of every loaded weight, which any change of weights alters in
    practice (as `resume.run_key`); weights offloaded to the meta device are named by the model's name alone."""
    return {"model": getattr(getattr(model, "config", None), "_name_or_path", None),
            "weights": sum(float(torch.sum(p.detach(), dtype=torch.float64)) for p in model.parameters()
                           if p.device.type != "meta")}


def _canonical(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


class Checkpoints:
    """The units of one run, kept under `root` until `remove` (called when the run has finished)."""

    def __init__(self, root: str | Path, key: dict):
        self.root, self.key = Path(root), _canonical(key)
        path = self.root / KEY
        if path.exists() and json.loads(path.read_text()) != self.key:
            print(f"ignoring the checkpoints in {self.root}: they are of another run")
            shutil.rmtree(self.root)
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(self.key, sort_keys=True))

    def _dir(self, name: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"checkpoint unit names are [A-Za-z0-9_.-]+, got {name!r}")
        return self.root / name

    def load(self, name: str):
        """The value saved as `name`, or None."""
        folder = self._dir(name)
        if not (folder / VALUE).exists():
            return None
        tensors = load_file(folder / TENSORS) if (folder / TENSORS).exists() else {}
        return _decode(json.loads((folder / VALUE).read_text()), tensors, folder)

    def save(self, name: str, value) -> None:
        """Write `value` as unit `name` (replacing it atomically)."""
        with atomic_dir(self._dir(name)) as tmp:
            tensors: dict[str, torch.Tensor] = {}
            tree = _encode(value, tensors, tmp)
            if tensors:
                save_file(tensors, tmp / TENSORS)
            (tmp / VALUE).write_text(json.dumps(tree))

    def unit(self, name: str, compute: Callable[[], object]):
        """The saved value of unit `name`, else `compute()`, saved before it is returned."""
        value = self.load(name)
        if value is None:
            value = compute()
            self.save(name, value)
        else:
            print(f"resuming: unit {name!r} read from {self.root}")
        return value

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def unit(store: Checkpoints | None, name: str, compute: Callable[[], object]):
    """`store.unit(name, compute)`, or `compute()` where there is no store."""
    return compute() if store is None else store.unit(name, compute)


def _encode(v, tensors: dict, folder: Path):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = v.detach().to("cpu").contiguous()
        return {"__tensor__": name}
    if isinstance(v, Region):
        name = f"region{sum(1 for _ in folder.glob('region*'))}.safetensors"
        regions.save(v, folder / name)
        return {"__region__": name}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x, tensors, folder) for x in v]}
    if isinstance(v, list):
        return [_encode(x, tensors, folder) for x in v]
    if isinstance(v, dict):
        if all(type(k) is str and not k.startswith("__") for k in v):
            return {k: _encode(x, tensors, folder) for k, x in v.items()}
        return {"__items__": [[_encode(k, tensors, folder), _encode(x, tensors, folder)] for k, x in v.items()]}
    raise TypeError(f"cannot checkpoint a value of type {type(v).__name__}")


def _decode(v, tensors: dict, folder: Path):
    if isinstance(v, list):
        return [_decode(x, tensors, folder) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tensor__" in v:
        return tensors[v["__tensor__"]]
    if "__region__" in v:
        return regions.load(folder / v["__region__"])
    if "__tuple__" in v:
        return tuple(_decode(x, tensors, folder) for x in v["__tuple__"])
    if "__items__" in v:
        return {_decode(k, tensors, folder): _decode(x, tensors, folder) for k, x in v["__items__"]}
    return {k: _decode(x, tensors, folder) for k, x in v.items()}
