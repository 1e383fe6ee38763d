"""Run one pipeline stage: validate params, execute its notebook with papermill, render HTML.

`python -m saferegions.stage baseline` executes notebooks/02_baseline.ipynb into
results/baseline/notebook.ipynb and notebook.html (narrative and outputs, without the code), passing the stage's
params sections as papermill parameters. The executed notebook replaces the old one only when the whole run succeeded.

Matrix stages take their matrix values as options (`python -m saferegions.stage identify --model aligned
--method snip`); each is passed to the notebook as a parameter of the same name, and the results go to
results/<stage>/<model>[-<method>]/ (the notebook gets that folder as `results_dir`).

The kernel runs with OMP_WAIT_POLICY=PASSIVE unless the caller sets it: on the shared 2-core machine, OpenMP's
default spin-waiting threads competing with other processes ran a 0.5B forward at 25 tok/s against 39 tok/s
passive (and 42 tok/s on one thread); an idle machine loses nothing measurable. It also names the stage's
generation store, artifacts/generations/<stage>[/<model>[/<method>]] (`generation_cache`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import config, generation_cache
from .io import atomic_path, write_json

NOTEBOOKS = {"data": "00_data", "models": "01_models", "baseline": "02_baseline", "calibrate": "03_calibrate",
             "identify": "04_identify", "validate": "05_validate", "overlap": "06_overlap", "esi": "07_esi",
             "set": "08_set", "spa": "09_spa", "report": "10_report"}
MATRIX = {"calibrate": ("model",), "identify": ("model", "method")}   # in results-folder order
GENERATING = ("baseline", "calibrate", "identify", "validate", "overlap", "esi", "set", "spa")
"""Stages that load a model to generate: each has a generation store, a persistent out in dvc.yaml."""


def _check_matrix(stage: str, params_file: Path, matrix: dict) -> None:
    """Every matrix value of the stage given, and each one a valid name (one error listing the choices)."""
    required = MATRIX.get(stage, ())
    missing = [k for k in required if not matrix.get(k)]
    extra = [k for k, v in matrix.items() if v and k not in required]
    if missing or extra:
        raise config.ConfigError(f"stage {stage!r} needs --{' --'.join(required) if required else '(no options)'}"
                                 f"; missing {missing}, unexpected {extra}")
    cfg = config.load(params_file)
    if "model" in required:
        config._choice("--model", matrix["model"], sorted(cfg.models))
    if "method" in required:
        config._choice("--method", matrix["method"], config.METHODS)


def results_dir(stage: str, matrix: dict | None = None) -> Path:
    matrix = matrix or {}
    parts = [matrix[k] for k in MATRIX.get(stage, ())]
    return Path("results") / stage / "-".join(parts) if parts else Path("results") / stage


def generations_dir(stage: str, matrix: dict | None = None) -> Path:
    """The stage's generation store (`generation_cache`), a persistent DVC out: kept across runs, so a re-run
    generates only what a changed model, edit, prompt or setting asks for."""
    matrix = matrix or {}
    return Path("artifacts/generations") / stage / "/".join(matrix[k] for k in MATRIX.get(stage, ()))


def render_html(notebook) -> str:
    """The notebook as a reader sees it: narrative, outputs and figures, no code (the .ipynb keeps the code)."""
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    return exporter.from_notebook_node(notebook)[0]


def run(stage: str, params_file: str = "params.yaml", root: str | Path = ".", **matrix) -> Path:
    root = Path(root)
    matrix = {k: v for k, v in matrix.items() if v}
    try:
        params = config.stage_params(stage, root / params_file)
        _check_matrix(stage, root / params_file, matrix)
    except config.ConfigError as e:
        sys.exit(f"invalid params for stage {stage!r}: {e}")
    # jsonschema builds an optional IRI format checker from rfc3987_syntax on import (2.3 s, a lark grammar);
    # notebook validation never uses that format, so the runner skips it (15 stages: ~35 s of `make repro`).
    sys.modules.setdefault("rfc3987_syntax", None)
    import nbformat
    import papermill as pm

    source = root / "notebooks" / f"{NOTEBOOKS[stage]}.ipynb"
    rel = results_dir(stage, matrix)
    out_dir = root / rel
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "notebook.ipynb"
    parameters = {"params": params, **matrix}
    if matrix:
        parameters["results_dir"] = str(rel)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # inherited by the kernel (module docstring)
    if stage in GENERATING:   # inherited by the kernel; created now, as DVC expects its out even if nothing is stored
        store = (root / generations_dir(stage, matrix)).resolve()
        store.mkdir(parents=True, exist_ok=True)
        os.environ[generation_cache.ENV] = str(store)
    start = time.time()
    with atomic_path(target) as tmp:
        pm.execute_notebook(str(source), str(tmp), parameters=parameters, cwd=str(root),
                            kernel_name="python3", progress_bar=False, log_output=False)
        html = render_html(nbformat.read(str(tmp), as_version=4))
        with atomic_path(out_dir / "notebook.html") as html_tmp:
            html_tmp.write_text(html)
    write_json(out_dir / "timing.json", {"stage": stage, **matrix, "wall_seconds": round(time.time() - start, 1)})
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m saferegions.stage")
    ap.add_argument("stage", choices=sorted(NOTEBOOKS))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default=None, help="model role (matrix stages)")
    ap.add_argument("--method", default=None, help=f"identification method: {', '.join(config.METHODS)}")
    args = ap.parse_args(argv)
    print(run(args.stage, args.params, model=args.model, method=args.method))


if __name__ == "__main__":
    main()
