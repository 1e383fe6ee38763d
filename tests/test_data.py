import json
from pathlib import Path

import pytest

from saferegions import data
from saferegions.io import sha256_file


def _fake_registry(monkeypatch, files: dict[str, bytes], tmp_path: Path, corrupt: str | None = None):
    mirror = tmp_path / "mirror"
    entries = []
    for name, content in files.items():
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(content)
        entries.append({"file": name, "sha256": sha256_file(mirror / name), "url": None})
    if corrupt:
        (mirror / corrupt).write_bytes(b"tampered")
    monkeypatch.setattr(data, "registry", lambda: entries)
    return mirror


def test_fetch_copies_and_checks_every_file(monkeypatch, tmp_path):
    mirror = _fake_registry(monkeypatch, {"a/x.csv": b"goal\nhi\n", "b.json": b"[]"}, tmp_path)
    dest = data.fetch(tmp_path / "data", mirror)
    assert (dest / "a/x.csv").read_bytes() == b"goal\nhi\n" and (dest / "b.json").exists()


def test_hash_mismatch_names_the_file_and_leaves_data_untouched(monkeypatch, tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "keep.txt").write_text("previous fetch")
    mirror = _fake_registry(monkeypatch, {"a/x.csv": b"ok", "b.json": b"[]"}, tmp_path, corrupt="b.json")
    with pytest.raises(ValueError, match="sha256 mismatch for b.json"):
        data.fetch(dest, mirror)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".data.*"))


def test_missing_mirror_only_file_is_one_clear_error(monkeypatch, tmp_path):
    mirror = _fake_registry(monkeypatch, {"a.csv": b"x"}, tmp_path)
    (mirror / "a.csv").unlink()
    with pytest.raises(FileNotFoundError, match="a.csv is mirror-only"):
        data.fetch(tmp_path / "data", mirror)
    assert not (tmp_path / "data").exists()


def test_registry_covers_the_manifest(mirror):
    names = {e["file"] for e in data.registry()}
    on_disk = {str(p.relative_to(mirror)) for p in mirror.rglob("*") if p.is_file() and p.name != "MANIFEST.md"}
    assert names == on_disk


def _rows(n_sets=3, n=40):
    return [{"dataset": f"s{s}", "prompt": f"prompt {s} {i}", "category": ""} for s in range(n_sets) for i in range(n)]


def test_splits_are_deterministic_sized_and_disjoint():
    rows = _rows() + [{"dataset": "s9", "prompt": "Prompt 0 1!", "category": ""}]  # same text as one in s0
    a = data.split_prompts(rows, ident_size=16, eval_min=8, seed=0)
    b = data.split_prompts(rows, ident_size=16, eval_min=8, seed=0)
    assert a == b
    assert a != data.split_prompts(rows, ident_size=16, eval_min=8, seed=1)
    for s in ("s0", "s1", "s2"):
        assert sum(r["dataset"] == s and r["split"] == "ident" for r in a) == 16
        assert sum(r["dataset"] == s and r["split"] == "eval" for r in a) == 24
    ident = {data._norm(r["prompt"]) for r in a if r["split"] == "ident"}
    assert not any(data._norm(r["prompt"]) in ident for r in a if r["split"] == "eval")


def test_small_sets_keep_eval_min_for_evaluation():
    out = data.split_prompts(_rows(1, 20), ident_size=128, eval_min=8, seed=0)
    assert sum(r["split"] == "ident" for r in out) == 12


def test_real_sets_normalise_into_one_schema(mirror, tmp_path):
    raw = data.fetch(tmp_path / "data", mirror)
    tables = data.build(raw, tmp_path / "out", ident_size=16, eval_min=8, alpaca_max=50, gsm8k_max=10, seed=0)
    sets = {r["dataset"] for r in tables["prompts"]}
    assert sets == set(data.SAFETY_SETS + data.BENIGN_SETS)
    assert all({"id", "dataset", "prompt", "category", "split"} <= set(r) for r in tables["prompts"])
    assert len({r["id"] for r in tables["prompts"]}) == len(tables["prompts"])
    assert {r["label"] for r in tables["judge"]} == {0, 1}
    util = tables["utility"]
    assert {(r["dataset"], r["split"]) for r in util} == {("gsm8k", "train"), ("gsm8k", "eval"),
                                                          ("sst2", "train"), ("sst2", "eval")}
    assert all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in util if r["dataset"] == "gsm8k")
    written = [json.loads(line) for line in (tmp_path / "out/prompts.jsonl").read_text().splitlines()]
    assert written == tables["prompts"]
    assert data.prompts(tmp_path / "out/prompts.jsonl", "advbench", "eval", 3) == \
        [r["prompt"] for r in tables["prompts"] if r["dataset"] == "advbench" and r["split"] == "eval"][:3]


def test_verify_refuses_changed_data(mirror, tmp_path):
    raw = data.fetch(tmp_path / "data", mirror)
    f = raw / "advbench/harmful_behaviors.csv"
    f.chmod(0o644)
    f.write_text("goal\ntampered\n")
    with pytest.raises(ValueError, match="advbench/harmful_behaviors.csv"):
        data.verify(raw)
