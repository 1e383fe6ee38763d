"""Run one pipeline stage: validate params, execute its notebook with papermill, render HTML.

`python -m saferegions.stage baseline` executes notebooks/02_baseline.ipynb into
results/baseline/notebook.ipynb (and notebook.html), passing the stage's params sections as papermill
parameters. The executed notebook replaces the old one only when the whole run succeeded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import config
from .io import atomic_path, write_json

NOTEBOOKS = {"data": "00_data", "models": "01_models", "baseline": "02_baseline"}


def run(stage: str, params_file: str = "params.yaml", root: str | Path = ".") -> Path:
    root = Path(root)
    try:
        params = config.stage_params(stage, root / params_file)
    except config.ConfigError as e:
        sys.exit(f"invalid params for stage {stage!r}: {e}")
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    source = root / "notebooks" / f"{NOTEBOOKS[stage]}.ipynb"
    out_dir = root / "results" / stage
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "notebook.ipynb"
    start = time.time()
    with atomic_path(target) as tmp:
        pm.execute_notebook(str(source), str(tmp), parameters={"params": params}, cwd=str(root),
                            kernel_name="python3", progress_bar=False, log_output=False)
        html, _ = HTMLExporter().from_notebook_node(nbformat.read(str(tmp), as_version=4))
        with atomic_path(out_dir / "notebook.html") as html_tmp:
            html_tmp.write_text(html)
    write_json(out_dir / "timing.json", {"stage": stage, "wall_seconds": round(time.time() - start, 1)})
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m saferegions.stage")
    ap.add_argument("stage", choices=sorted(NOTEBOOKS))
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    print(run(args.stage, args.params))


if __name__ == "__main__":
    main()
