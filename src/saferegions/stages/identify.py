"""The identify stage: one registered method (`methods.REGISTRY`) on one model, a region per dataset.

Per prompt set the method's runner yields the utility region, and per identification dataset a raw and a refined
region (`methods/context.py`). This module builds the runner's Context from params and the calibrate stage's
examples, saves every region with its granularity in its meta (so `methods.removal.ablation` knows how to remove it),
and turns the regions into the summary rows, tables and metrics.json the notebook shows.

Under `run.distributed: fsdp` the notebook's process loads no model: `run` re-launches the identification on
`run.nproc` ranks (`distributed.relaunch`, `on_ranks`). Each rank loads the model, shards it with FSDP2, scores and
selects on its local shards (`methods.sharded()`: SNIP and Wanda), and rank 0 alone writes each region, gathered
from the ranks' packed bits (`distributed.gather_packed`), and the summary rows the notebook reads back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import tempfile
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

from .. import config, evaluation, judges, methods, models, plots, regions  # noqa: F401  (config, plots: re-exported)
from .. import distributed
from ..tables import params_table, table  # noqa: F401  (re-exported: the notebook shows its tables with them)
from ..hooks import single_thread
from .. import results as results_
from .. import calibration
from ..checkpoints import Checkpoints, digest, model_identity
from ..methods.context import Context, load_calibration, load_utility_eval
from ..methods.removal import granularity_of
from ..models import component, layer_index
from ..regions import PackedRegion, Region, RegionKind

RESOLVES = methods.Resolves.ITEM_METHOD   # runs its matrix item's method: DVC deps on that method's code only
CHECKPOINTS = Path("artifacts/checkpoints/identify")   # finished units of a run (not a DVC output; see `run`)


def out_dir(role: str, method: str) -> Path:
    return Path("artifacts/identify") / role / method


def description(method: str) -> str:
    return methods.get(method).description


def datasets(cfg, method: str) -> tuple[list[str], list[str]]:
    """(datasets the method runs on, calibrated datasets it skips: `identify.<method>.datasets`)."""
    ds = cfg.identify.datasets(method, cfg.calibrate.datasets)
    return ds, [d for d in cfg.calibrate.datasets if d not in ds]


@dataclasses.dataclass(frozen=True)
class Launch:
    """What each rank of a `run.distributed: fsdp` identification rebuilds its Context from (`on_ranks`)."""
    params: dict      # the parsed params as plain data (`config.parse` reads them back)
    role: str
    method: str
    nproc: int


def plain_params(cfg) -> dict:
    """`cfg` (parsed params) as the plain dict `config.parse` turns back into it."""
    return {k: {r: dataclasses.asdict(m) for r, m in v.items()} if isinstance(v, dict) else dataclasses.asdict(v)
            for k, v in vars(cfg).items()}


def context(cfg, role: str, method: str) -> Context:
    """Model `role` loaded, its calibration examples (stage calibrate) and the method's params, as the runner reads
    them. Under `run.distributed: fsdp`, outside a process group, no model is loaded: the Context carries the
    `Launch` that `run` re-launches on the ranks."""
    folder = Path("artifacts/calibrate") / role
    calib, calib_meta = load_calibration(folder)
    ds = datasets(cfg, method)[0]
    in_group = torch.distributed.is_initialized()
    if cfg.run.distributed == "fsdp" and not in_group:
        return Context(None, None, role, cfg.models[role].id, calib, ds, cfg.calibrate.utility_set, cfg.identify,
                       cfg.run.seed, calib_meta["system_prompt"],
                       launch=Launch(plain_params(cfg), role, method, cfg.run.nproc))
    device, dtype = cfg.run.device, cfg.run.dtype
    if in_group:     # loaded on the CPU: `distributed.shard` moves each rank's shards to its device
        if dtype == "auto" and distributed.device().type == "cuda":
            dtype = "bfloat16"     # what "auto" means on the rank's GPU
        device = "cpu"
    lm, tok = models.load(cfg.models[role].entry(), dtype=dtype, device=device)
    halves = cfg.identify.split_half_datasets
    judge = None if in_group else judges.get(cfg.evaluation.judge, cfg)   # the sharded methods judge nothing
    ctx = Context(lm, tok, role, cfg.models[role].id, calib, ds,
                  cfg.calibrate.utility_set, cfg.identify, cfg.run.seed, calib_meta["system_prompt"],
                  judge=judge,
                  max_new_tokens=calib_meta["max_new_tokens"], gen_batch_size=cfg.calibrate.batch_size,
                  utility_eval=load_utility_eval(folder), utility=evaluation.utility_score,
                  split_half=[d for d in ds if halves is None or d in halves],
                  asked=calib_meta.get("asked", {}), refusals=functools.partial(
                      calibration.refusal_examples, lm, tok, judge=judge, redraws=cfg.calibrate.redraws,
                      temperature=cfg.calibrate.temperature, seed=cfg.run.seed,
                      max_new_tokens=calib_meta["max_new_tokens"], batch_size=cfg.calibrate.batch_size,
                      system=calib_meta["system_prompt"]))
    settings = {"judge": cfg.evaluation.judge, "redraws": cfg.calibrate.redraws,
                "temperature": cfg.calibrate.temperature}
    root = CHECKPOINTS / role / method
    if in_group:     # each rank keeps the units of its own shards
        settings["rank"], settings["world_size"] = distributed.rank(), distributed.world_size()
        root = root / f"rank{distributed.rank()}-of-{distributed.world_size()}"
    ctx.checkpoints = Checkpoints(root, run_key(ctx, method, settings))
    return ctx


def run_key(ctx: Context, method: str, settings: dict) -> dict:
    """What makes two identifications the same (`checkpoints`): the method and its params, the model and its
    weights, the calibration examples, the prompt and pair files and the stage's `settings` beyond the Context."""
    files = [Path(f) for f in (ctx.prompts_path, ctx.pairs_path) if Path(f).exists()]
    return {"method": method, "role": ctx.role, "model_id": ctx.model_id, **model_identity(ctx.model),
            "params": dataclasses.asdict(ctx.cfg), "calibration": digest(ctx.calib), "files": digest(*files),
            "utility_eval": digest(ctx.utility_eval), "datasets": ctx.datasets, "utility_set": ctx.utility_set,
            "split_half": ctx.split_half, "asked": ctx.asked, "seed": ctx.seed, "system": ctx.system,
            "max_new_tokens": ctx.max_new_tokens, "gen_batch_size": ctx.gen_batch_size, **settings}


def profile(region: Region | PackedRegion) -> tuple[dict[int, float], dict[str, float]]:
    """Density per decoder layer and per component (q/k/v/o/gate/up/down...) of a base-space region."""
    counts: dict = defaultdict(lambda: [0, 0])
    comps: dict = defaultdict(lambda: [0, 0])
    for name, shape in regions.shapes(region).items():
        k = int(region.masks[name].count_nonzero()) if isinstance(region, Region) else region.count(name)
        n = math.prod(shape)
        for tally, key in ((counts, layer_index(name)), (comps, component(name))):
            tally[key][0] += k
            tally[key][1] += n
    return ({l: a / b for l, (a, b) in sorted(counts.items()) if l is not None},
            {c: a / b for c, (a, b) in comps.items() if c is not None})


def run(method: str, ctx: Context, out: str | Path) -> list[dict]:
    """Run one method, save every region as it is produced (bool masks are dropped right after packing), each
    carrying the method's granularity in its meta, and return one summary row per region: size, density,
    per-layer and per-component density, native units. With `ctx.checkpoints` (set by `context`) every finished
    unit of the runner (one dataset's work) is kept there until all regions are saved, so a re-run after a kill
    skips it and ends as an uninterrupted run. With `ctx.launch` the run happens on FSDP2 ranks (`on_ranks`); on a
    rank of a sharded model, rank 0 saves the regions gathered from every rank and alone returns rows."""
    if ctx.launch is not None:
        return relaunched(ctx, out)
    entry = methods.get(method)
    shapes = {n: tuple(p.shape) for n, p in ctx.model.named_parameters()} if distributed.sharded(ctx.model) else None
    rows = []
    for dataset, kind, region in entry.run(ctx):
        region.meta = {**region.meta, "granularity": entry.granularity}
        with single_thread():
            if shapes is not None:
                region = distributed.gather_packed(region, shapes)
                if region is None:     # not rank 0
                    continue
            regions.save(region, regions.region_path(out, dataset, kind))
            size, numel = region.size, region.numel
            row = {"dataset": dataset, "kind": kind, "size": size, "numel": numel, "density": size / numel,
                   **granularity_of(region).units_summary(region)}
            if not kind.endswith(".lora"):
                row["by_layer"], row["by_component"] = profile(region)
        rows.append(row)
    if ctx.checkpoints is not None:
        ctx.checkpoints.remove()
    return rows


def on_ranks(params_file: str, role: str, method: str, out: str, result_file: str) -> None:
    """One rank of a `run.distributed: fsdp` identification (started by `relaunched`): the model loaded and sharded
    with FSDP2, `run` on its local shards; rank 0 writes the summary rows and the method's metrics and details to
    `result_file` (JSON)."""
    cfg = config.parse(json.loads(Path(params_file).read_text()))
    ctx = context(cfg, role, method)
    distributed.shard(ctx.model)
    rows = run(method, ctx, out)
    with distributed.on_main(result_file) as tmp:
        if tmp is not None:
            Path(tmp).write_text(json.dumps({"rows": rows, "metrics": ctx.metrics, "details": ctx.details}))


def relaunched(ctx: Context, out: str | Path) -> list[dict]:
    """`run` of `ctx.launch` on its ranks under torchrun (`on_ranks`): the rows rank 0 returned; the method's
    metrics and details go to `ctx` as a one-process run would put them."""
    launch = ctx.launch
    with tempfile.TemporaryDirectory() as tmp:
        params, result = Path(tmp) / "params.json", Path(tmp) / "result.json"
        params.write_text(json.dumps(launch.params))
        distributed.relaunch(f"{__name__}:on_ranks", launch.nproc, [params, launch.role, launch.method, out, result])
        got = json.loads(result.read_text())
    with contextlib.suppress(OSError):     # every rank removed its own checkpoints; drop their emptied folder
        (CHECKPOINTS / launch.role / launch.method).rmdir()
    ctx.metrics.update(got["metrics"])
    ctx.details.update(got["details"])
    for row in got["rows"]:       # JSON made the layer indices strings
        if "by_layer" in row:
            row["by_layer"] = {int(layer): d for layer, d in row["by_layer"].items()}
    return got["rows"]


def metrics(rows: list[dict], method: str, role: str, model_id: str, details: dict,
            extra: dict | None = None) -> dict:
    """results/identify/<model>-<method>/metrics.json: sizes and densities per dataset, raw and refined, plus the
    method's own numbers (`Context.metrics`: NLSR training and seed IoU, neuron density vs n, SafeLayer prompts
    per side)."""
    out = {"method": method, "model": model_id, "role": role, "datasets": {}, **(extra or {})}
    for r in rows:
        entry = {"size": r["size"], "density": r["density"], **{k: r[k] for k in ("n_units",) if k in r}}
        kind = RegionKind(r["kind"])
        if kind is RegionKind.UTILITY:
            out["utility"] = {"dataset": r["dataset"], **entry}
        elif kind is not RegionKind.UTILITY_LORA:   # raw, refined, the halves and the LoRA-space regions
            out["datasets"].setdefault(r["dataset"], {})[kind.value.replace(".", "_")] = entry
    if "lora_loss" in details:
        out["lora_loss_first"], out["lora_loss_last"] = details["lora_loss"][0], details["lora_loss"][-1]
    return out


def write_metrics(rows: list[dict], method: str, role: str, ctx: Context, results: str | Path) -> None:
    results_.save("identify", Path(results) / "metrics.json",
                  metrics(rows, method, role, ctx.model_id, ctx.details, ctx.metrics))


# ---------------------------------------------------------------- tables for the notebook


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per saved region: dataset, kind, size, density and native-unit counts."""
    cols = [c for c in ("dataset", "kind", "size", "numel", "density", "n_units", "n_ffn", "n_q", "n_k", "n_v",
                        "n_o", "layers") if any(c in r for r in rows)]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows])


def density_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """The utility, raw and refined rows of the summary (the density bar chart)."""
    return summary[summary.kind.isin(["raw", "refined", "utility"])]


def profile_frame(rows: list[dict], kind: str, axis: str) -> pd.DataFrame:
    """dataset × layer (axis="by_layer") or dataset × component ("by_component") densities of one kind."""
    frame = pd.DataFrame({r["dataset"]: r[axis] for r in rows if r["kind"] == kind}).T
    if axis == "by_component":
        order = [c for c in ("q", "k", "v", "o", "gate", "up", "down", "gate_up") if c in frame.columns]
        frame = frame[order]
    return frame


def pq_frame(ctx: Context) -> pd.DataFrame | None:
    """The p/q sweep (`methods.context.pq_sweep`) as a frame for the figure, or None where the method ran none."""
    points = ctx.metrics.get("pq_sweep")
    return pd.DataFrame(points) if points else None


def method_details(method: str, ctx: Context, cfg) -> dict:
    """The method's own diagnostics ({"text": [...], "tables": [...], "curves": [...]}, see `methods.Method`);
    empty lists for a method that has none."""
    return methods.get(method).report(ctx, cfg)
