"""Artifacts are byte-deterministic: the same content written by separate processes gives the same bytes, so DVC
sees no change where there is none."""
import hashlib
import subprocess
import sys
import textwrap

WRITE = textwrap.dedent("""
    import sys, torch
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from saferegions import judges, plots, regions as R
    from saferegions.io import write_json, write_jsonl
    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    masks = {f"model.layers.{i}.mlp.{p}_proj.weight": torch.rand(64, 48, generator=g) < 0.05
             for i in range(3) for p in ("gate", "up", "down")}
    region = R.Region(masks, meta={"method": "snip", "dataset": "advbench", "n": 16, "seed": 0,
                                   "selection": {"q": 0.02, "group": "matrix"}}, units={"layers": [0, 2]})
    R.save(region, f"{out}/region.bits.safetensors", encoding="bits")
    R.save(region, f"{out}/region.indices.safetensors", encoding="idx")
    judges.LearnedJudge(None, None, torch.arange(8.0), torch.tensor(0.5), 32).save(
        f"{out}/judge.safetensors", {"trained_on": 100, "features": "minilm", "classes": ["refused", "complied"]})
    write_json(f"{out}/metrics.json", {"b": 1, "a": {"y": 0.5, "x": [1, 2]}})
    write_jsonl(f"{out}/rows.jsonl", [{"id": 1, "prompt": "é"}, {"id": 2, "prompt": "x"}])
    fig, ax = plt.subplots()
    ax.errorbar([0, 1], [0.2, 0.4], yerr=[0.1, 0.1])
    plots.save(fig, f"{out}/figure.png")
""")
FILES = ("region.bits.safetensors", "region.indices.safetensors", "judge.safetensors", "metrics.json",
         "rows.jsonl", "figure.png")


def _digests(folder):
    subprocess.run([sys.executable, "-c", WRITE, str(folder)], check=True)
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES}


def test_two_processes_write_identical_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_region_round_trips_through_the_canonical_header(tmp_path):
    import torch
    from saferegions import regions as R

    masks = {"w": torch.tensor([[True, False], [False, True]]), "a": torch.zeros(3, dtype=torch.bool)}
    region = R.Region(masks, meta={"z": 1, "a": [1, 2]}, units={"layers": [1]})
    R.save(region, tmp_path / "r.safetensors")
    back = R.load(tmp_path / "r.safetensors")
    assert list(back.masks) == ["w", "a"]   # tensor order kept although the header's keys are sorted
    assert all(torch.equal(back.masks[n], masks[n]) for n in masks)
    assert back.meta == region.meta and back.units == region.units


def test_undefined_statistics_are_written_as_null(tmp_path):
    import json
    import math

    import numpy as np
    from saferegions.io import write_json

    write_json(tmp_path / "m.json", {"auroc": math.nan, "ci": (float("inf"), 0.5), "p": np.float64("nan"), "n": 0})
    assert json.loads((tmp_path / "m.json").read_text()) == {"auroc": None, "ci": [None, 0.5], "p": None, "n": 0}
