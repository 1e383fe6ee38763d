"""Memory plan of a params file: peak GPU and host memory of every stage, from model configs alone.

    python -m saferegions.plan [params.yaml] [--gpu-gb 80] [--host-gb 32] [--out results/plan/plan.json]

Each model is built on the meta device (config only, no weights), so the plan runs before any download. The
memory model follows the code path each stage takes (`memory.py` holds the per-stage accounting) under the
training design of `train.py`/`optim.py`: masked arms keep fp32 master copies and two fp32 Adam moments of the
masked entries only, full fine-tuning keeps fp32 moments for every weight, score accumulators are fp32 and masks
on host are packed bits. A stage that does not fit is one clear error (exit 1) naming it and the shortfall.

With a GPU size, each stage part also gets the number of such GPUs it needs under FSDP2 full sharding
(`run.distributed: fsdp`; `gpus`): the smallest N in 1, 2, 4, 8 with

    N = 1:  the part's single-GPU peak <= G
    N > 1:  max over the part's phases of (sharded / N + whole) <= G

where `sharded` is what FSDP2 divides over the ranks (weights, gradients, optimizer state, fp32 score
accumulators, masks) and `whole` what every rank holds in full (activations and KV cache at the params' batch and
length, the judge, replicated, and the all-gathered parameters: the root unit plus two decoder blocks, three in a
phase with a backward; `memory.Phase.fsdp`). None of 1-8 fitting reads "> 8". The verdict (`fits`) stays the
single-GPU one: the stages do not yet re-launch under torchrun.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import transformers as T

from . import config
from .io import write_json

GB = 1e9
OUT = Path("results/plan/plan.json")


@dataclass(frozen=True)
class Shape:
    """What the memory model reads from one model: parameter counts and the sizes activations scale with."""
    id: str
    family: str
    params: int          # every parameter
    eligible: int        # decoder-block linear weights (`models.eligible_weights`): the identify methods' space
    esi: int             # `methods.esi.eligible_esi`: ESI's space and the masked arms'
    largest: int         # the largest single parameter (one gradient alive at a time)
    linear_io: int       # Σ (in + out) over the block linears: a LoRA adapter's size is r x this
    hidden: int
    layers: int
    ffn: int             # FFN width one token passes through (x top-k for MoE)
    q_dim: int
    kv_dim: int
    vocab: int
    block: int = 0       # the largest decoder block's parameters: one FSDP2 unit
    root: int = 0        # parameters outside the blocks (embeddings, final norm, lm_head): FSDP2's root unit


# ---------------------------------------------------------------- configs


def shipped_config(hub_id: str) -> dict | None:
    """The shipped copy of a hub model's public config.json (registry/configs/), or None."""
    path = resources.files("saferegions").joinpath(f"registry/configs/{hub_id.replace('/', '--')}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def load_config(entry, models_root: str | Path = "models"):
    """The model's config, without weights: the local folder, a tiny family, the HF cache, or the shipped copy."""
    local = Path(models_root) / entry.offline / "config.json" if entry.offline else None
    if local is not None and local.exists():
        return T.AutoConfig.from_pretrained(local.parent)
    if entry.offline and entry.offline.startswith("tiny-"):
        from . import tiny
        family = entry.offline.removeprefix("tiny-")
        with torch.device("meta"):
            return (tiny.tiny_encoder() if family == "bert" else tiny.tiny_model(family))[0].config
    try:
        return T.AutoConfig.from_pretrained(entry.id, revision=getattr(entry, "revision", None), local_files_only=True)
    except OSError:
        pass
    raw = shipped_config(entry.id)
    if raw is None:
        raise FileNotFoundError(f"no config for {entry.id!r}: not in {local or 'models/'}, the HF cache, or "
                                f"src/saferegions/registry/configs/")
    return T.AutoConfig.for_model(**raw)


def meta_model(cfg):
    """The model built on the meta device: shapes only, no memory."""
    encoder = getattr(cfg, "model_type", "") == "bert"
    with torch.device("meta"):
        return (T.AutoModel if encoder else T.AutoModelForCausalLM).from_config(cfg)


def shape_of(model, hub_id: str = "") -> Shape:
    from .methods.esi import eligible_esi
    from .models import component, layer_index
    named = dict(model.named_parameters())
    per_layer: dict[int, int] = {}
    for n, p in named.items():
        if (i := layer_index(n)) is not None:
            per_layer[i] = per_layer.get(i, 0) + p.numel()
    block = {n: p for n, p in named.items() if component(n) not in (None, "router")}
    c = model.config
    c = getattr(c, "text_config", None) or c
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    experts_k = getattr(c, "num_experts_per_tok", None)
    ffn = (getattr(c, "moe_intermediate_size", None) or c.intermediate_size) * (experts_k or 1)
    ffn += getattr(c, "shared_expert_intermediate_size", 0) or 0
    linear_io = sum(sum(p.shape[-2:]) * (p.shape[0] if p.dim() == 3 else 1) for p in block.values())
    return Shape(id=hub_id, family=c.model_type, params=sum(p.numel() for p in named.values()),
                 eligible=sum(p.numel() for p in block.values()),
                 esi=sum(p.numel() for p in eligible_esi(model).values()) if block else 0,
                 largest=max(p.numel() for p in named.values()), linear_io=int(linear_io), hidden=c.hidden_size,
                 layers=c.num_hidden_layers, ffn=ffn, q_dim=heads * head_dim,
                 kv_dim=getattr(c, "num_key_value_heads", heads) * head_dim, vocab=c.vocab_size,
                 block=max(per_layer.values(), default=0),
                 root=sum(p.numel() for p in named.values()) - sum(per_layer.values()))


def shapes(cfg, models_root: str | Path = "models") -> dict[str, Shape]:
    """{role: Shape} for every model role of the params, plus 'judges.llama_guard' when set."""
    entries = dict(cfg.models)
    guard = getattr(cfg.judges, "llama_guard", None)
    if guard is not None:
        entries["judges.llama_guard"] = guard
    return {role: shape_of(meta_model(load_config(e, models_root)), e.id) for role, e in entries.items()}


# ---------------------------------------------------------------- verdict and table


@dataclass
class Limits:
    gpu_gb: float | None   # None: the params run on CPU, everything is host memory
    host_gb: float


def shortfalls(rows: list[dict], limits: Limits) -> list[str]:
    """One line per row that does not fit: the stage, what it needs and how much is missing."""
    out = []
    for r in rows:
        if limits.gpu_gb is not None and r["device_gb"] > limits.gpu_gb:
            out.append(f"{r['stage']} ({r['part']}) needs {r['device_gb']:.1f} GB of GPU memory: "
                       f"{r['device_gb'] - limits.gpu_gb:.1f} GB more than --gpu-gb {limits.gpu_gb:g}")
        if r["host_gb"] > limits.host_gb:
            out.append(f"{r['stage']} ({r['part']}) needs {r['host_gb']:.1f} GB of host RAM: "
                       f"{r['host_gb'] - limits.host_gb:.1f} GB more than --host-gb {limits.host_gb:g}")
    return out


FSDP_GPUS = (1, 2, 4, 8)


def gpus(row: dict, gpu_gb: float) -> int | None:
    """GPUs of `gpu_gb` a stage part needs under FSDP2 full sharding: the smallest of `FSDP_GPUS` where every
    phase's sharded / N + whole fits (module docstring); 1 where the single-GPU peak fits; None above 8."""
    if row["device_gb"] <= gpu_gb:
        return 1
    return next((n for n in FSDP_GPUS[1:] if max(sh / n + wh for sh, wh in row["fsdp"]) <= gpu_gb), None)


def table(rows: list[dict], limits: Limits) -> str:
    """Markdown table: device breakdown of each row's peak, device and host peaks, whether it fits, and (with a
    GPU) the GPUs it needs under FSDP2."""
    from .memory import CATEGORIES
    gpu = limits.gpu_gb is not None
    head = ["stage", "part", *CATEGORIES, *(["GPU peak"] if gpu else []), "host peak", "fits",
            *(["GPUs (FSDP2)"] if gpu else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peaks = [f"{r['device_gb']:.1f}"] if gpu else []
        n = [str(r["gpus_fsdp"] or "> 8")] if gpu else []
        lines.append("| " + " | ".join([r["stage"], r["part"], *(f"{r['device'][c]:.1f}" for c in CATEGORIES),
                                        *peaks, f"{r['host_gb']:.1f}", "yes" if r["fits"] else "**NO**", *n]) + " |")
    note = (f"GB (1e9 bytes); the breakdown is of the {'GPU' if gpu else 'host'} peak; limits: "
            + (f"GPU {limits.gpu_gb:.1f} GB, " if gpu else "") + f"host {limits.host_gb:.1f} GB")
    return "\n".join(lines) + "\n\n" + note


def build(params: str | Path, limits: Limits, models_root: str | Path = "models") -> dict:
    """The plan of a params file: shapes, rows (one per stage part) and the shortfalls."""
    from . import memory
    cfg = config.load(params)
    found = shapes(cfg, models_root)
    rows = memory.rows(cfg, found, on_gpu=limits.gpu_gb is not None)
    for r in rows:
        r["fits"] = not shortfalls([r], limits)
        if limits.gpu_gb is not None:
            r["gpus_fsdp"] = gpus(r, limits.gpu_gb)
    return {"params": str(params), "limits": asdict(limits), "shapes": {k: asdict(v) for k, v in found.items()},
            "rows": rows, "shortfalls": shortfalls(rows, limits)}


def default_limits(cfg, gpu_gb: float | None, host_gb: float | None) -> Limits:
    """--gpu-gb defaults to the params' device (cpu: no GPU, plan against host RAM only; cuda: this machine's
    GPU); given, it plans a GPU run of that size. --host-gb defaults to this machine's RAM."""
    import psutil
    host = host_gb if host_gb is not None else psutil.virtual_memory().total / GB
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if gpu_gb is None and device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("plan: run.device is cuda but no GPU is visible here; give --gpu-gb")
        gpu_gb = torch.cuda.get_device_properties(0).total_memory / GB
    return Limits(gpu_gb=gpu_gb, host_gb=host)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saferegions.plan", description=__doc__.splitlines()[0])
    ap.add_argument("params", nargs="?", default="params.yaml")
    ap.add_argument("--gpu-gb", type=float, default=None, help="GPU memory (default: the params' run.device)")
    ap.add_argument("--host-gb", type=float, default=None, help="host RAM (default: this machine's)")
    ap.add_argument("--models-root", default="models")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    limits = default_limits(config.load(args.params), args.gpu_gb, args.host_gb)
    plan = build(args.params, limits, args.models_root)
    print(table(plan["rows"], limits))
    if plan["shortfalls"]:
        print(f"plan: {len(plan['shortfalls'])} stage part(s) of {args.params} do not fit; nothing was loaded:\n  "
              + "\n  ".join(plan["shortfalls"]), file=sys.stderr)
        return 1
    write_json(args.out, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
