import contextlib
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest

from saferegions import data
from saferegions.io import read_jsonl, sha256_file

UPSTREAM = "https://raw.githubusercontent.com/"


def _fake_registry(monkeypatch, files: dict[str, bytes], tmp_path: Path, corrupt: str | None = None,
                   optional: tuple[str, ...] = ()):
    mirror = tmp_path / "mirror"
    entries = []
    for name, content in files.items():
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(content)
        entries.append({"file": name, "sha256": sha256_file(mirror / name), "url": None,
                        **({"optional": True} if name in optional else {})})
    if corrupt:
        (mirror / corrupt).write_bytes(b"tampered")
    monkeypatch.setattr(data, "registry", lambda: entries)
    return mirror


@contextlib.contextmanager
def _serve(root: Path, lifetime: float = 120):
    """`root` over HTTP on 127.0.0.1 (a free port) from a thread; stopped on exit, or by itself after `lifetime` s.
    Yields the base URL and the list of paths requested."""
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(root), **kw)

        def log_request(self, code="-", size="-"):
            requested.append(self.path)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    deadline = threading.Timer(lifetime, server.shutdown)
    deadline.daemon = True
    thread.start()
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requested
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def no_mirror(monkeypatch):
    """fetch() without a mirror, reaching the loopback server directly (no proxy)."""
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


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


def test_optional_entries_are_skipped_when_absent_and_checked_when_present(monkeypatch, tmp_path):
    mirror = _fake_registry(monkeypatch, {"a.csv": b"x", "extra/b.csv": b"y"}, tmp_path, optional=("extra/b.csv",))
    (mirror / "extra/b.csv").unlink()
    dest = data.fetch(tmp_path / "data", mirror)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["a.csv"]
    data.verify(dest)   # an absent optional file is not an error
    (mirror / "extra/b.csv").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256 mismatch for extra/b.csv"):
        data.fetch(dest, mirror)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["a.csv"]


def test_registry_marks_url_less_and_unread_entries_optional():
    entries = data.registry()
    assert all(e.get("optional") for e in entries if not e["url"])
    optional = {e["file"] for e in entries if e.get("optional")}
    assert {"dan_forbidden_questions/forbidden_question_set.csv", "jailbreakbench/benign-behaviors.csv"} <= optional
    assert all(e["url"].startswith((UPSTREAM, "pip:")) for e in entries if not e.get("optional"))


def _upstream_layout(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, dict[str, str]]:
    """Files placed as raw.githubusercontent.com lays them out (owner/repo/commit/path); their upstream URLs."""
    served, urls = tmp_path / "served", {}
    for name, content in files.items():
        path = f"owner/repo/{'0' * 40}/data/{name}"
        (served / path).parent.mkdir(parents=True, exist_ok=True)
        (served / path).write_bytes(content)
        urls[name] = UPSTREAM + path
    return served, urls


def test_fetch_over_http_without_mirror(monkeypatch, tmp_path, no_mirror):
    files = {"advbench/harmful_behaviors.csv": b"goal,target\nx,y\n", "gsm8k/test.jsonl": b'{"question": "1+1"}\n',
             "extra/unread.json": b"[]"}
    served, urls = _upstream_layout(tmp_path, files)
    with _serve(served) as (base, requested):
        entries = [{"file": n, "sha256": hashlib.sha256(c).hexdigest(), "url": urls[n].replace(UPSTREAM, base)}
                   for n, c in files.items()]
        entries[2]["optional"] = True   # served, but optional entries are never downloaded
        entries.append({"file": "extra/url_less.csv", "sha256": "0" * 64, "url": None, "optional": True})
        monkeypatch.setattr(data, "registry", lambda: entries)
        dest = data.fetch(tmp_path / "data")
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {n: files[n] for n in ("advbench/harmful_behaviors.csv", "gsm8k/test.jsonl")}
    assert sorted(requested) == sorted("/" + urls[n].removeprefix(UPSTREAM) for n in got)


def test_http_sha256_mismatch_or_missing_file_errors_and_leaves_nothing(monkeypatch, tmp_path, no_mirror):
    served, urls = _upstream_layout(tmp_path, {"a.csv": b"as pinned", "b.csv": b"changed upstream"})
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "keep.txt").write_text("previous fetch")
    with _serve(served) as (base, _):
        pinned = hashlib.sha256(b"as pinned").hexdigest()
        entries = [{"file": n, "sha256": pinned, "url": urls[n].replace(UPSTREAM, base)} for n in ("a.csv", "b.csv")]
        monkeypatch.setattr(data, "registry", lambda: entries)
        with pytest.raises(ValueError, match="sha256 mismatch for b.csv"):
            data.fetch(dest)
        entries[1]["url"] = base + "owner/repo/missing.csv"
        with pytest.raises(RuntimeError, match="could not fetch b.csv from .*missing.csv"):
            data.fetch(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".data.*"))


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
    ids = {(r["id"], r["prompt"]) for r in a}
    assert len({i for i, _ in ids}) == len(a) and {p for _, p in ids} <= {r["prompt"] for r in rows}


def test_small_sets_keep_eval_min_for_evaluation():
    out = data.split_prompts(_rows(1, 20), ident_size=128, eval_min=8, seed=0)
    assert sum(r["split"] == "ident" for r in out) == 12
    assert {r["split"] for r in data.split_prompts(_rows(1, 5), ident_size=4, eval_min=8, seed=0)} == {"eval"}
    assert {r["split"] for r in data.split_prompts(_rows(1, 5), ident_size=9, eval_min=0, seed=0)} == {"ident"}


WRITE_TWICE = r'''
import csv, sys
from pathlib import Path
from saferegions import data
from saferegions.io import read_jsonl
tmp = Path(sys.argv[1])
(tmp / "raw").mkdir(exist_ok=True)
with open(tmp / "raw/set.csv", "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows([("goal", "cat")] + [(f'Prompt {i} é/ü "q"', f"c{i % 3}") for i in range(60)])
data.registry = lambda: [{"file": "set.csv", "sha256": data.sha256_file(tmp / "raw/set.csv"), "url": None}]
d = data._load(tmp / "raw", "set.csv")
rows = data._rows("s", d["goal"], d["cat"]) + [{"dataset": "t", "prompt": f"t {i}", "category": ""} for i in range(30)]
written = data.write_table(Path(sys.argv[2]), data.split_prompts(rows, ident_size=16, eval_min=8, seed=3))
assert written == read_jsonl(sys.argv[2])
'''


def test_writes_are_byte_identical_across_processes_and_leave_no_cache(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_CACHE"))}
    outs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"prompts-{hash_seed}.jsonl"
        subprocess.run([sys.executable, "-c", WRITE_TWICE, str(tmp_path), str(out)], check=True, timeout=300,
                       env={**env, "HOME": str(home), "PYTHONHASHSEED": hash_seed})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0].isascii()
    rows = read_jsonl(tmp_path / "prompts-1.jsonl")
    assert [list(r) for r in rows[:1]] == [["id", "dataset", "prompt", "category", "split"]]
    assert len(rows) == 90 and {r["prompt"] for r in rows if r["dataset"] == "s"} == {
        f'Prompt {i} é/ü "q"' for i in range(60)}
    assert not list(home.rglob("*")), "datasets wrote under HOME"
    assert not list(tmp_path.glob(".tmp.*"))


def test_pipeline_data_fetches_over_http_without_mirror_and_builds_deterministically(mirror, tmp_path, monkeypatch,
                                                                                      no_mirror):
    """The required registry entries, served from 127.0.0.1 as their upstream URLs lay them out, are all the data
    stage needs; the stage's tables come out byte-identical from a second process."""
    served, entries = tmp_path / "served", []
    for e in data.registry():
        path = e["url"].removeprefix(UPSTREAM) if (e["url"] or "").startswith(UPSTREAM) else \
            f"pypi/{e['url'].split(':')[2]}" if e["url"] else None
        if path:   # every file is served; only the required ones may be requested
            (served / unquote(path)).parent.mkdir(parents=True, exist_ok=True)
            (served / unquote(path)).symlink_to(mirror / e["file"])
        entries.append({**e, "url": path})
    required = {e["file"] for e in entries if not e.get("optional")}
    with _serve(served) as (base, requested):
        patched = [{**e, "url": e["url"] and base + e["url"]} for e in entries]
        real_registry = data.registry
        monkeypatch.setattr(data, "registry", lambda: patched)
        raw = data.fetch(tmp_path / "data")
        monkeypatch.setattr(data, "registry", real_registry)
    assert {str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()} == required
    assert len(requested) == len(required)

    kw = dict(ident_size=16, eval_min=8, alpaca_max=50, gsm8k_max=10, seed=0)
    tables = data.build(raw, tmp_path / "out", **kw)
    sets = {r["dataset"] for r in tables["prompts"]}
    assert sets == set(data.SAFETY_SETS + data.BENIGN_SETS)
    assert all({"id", "dataset", "prompt", "category", "split"} <= set(r) for r in tables["prompts"])
    assert len({r["id"] for r in tables["prompts"]}) == len(tables["prompts"])
    for s in sets:   # identification and evaluation prompts never share a text
        split = {k: {data._norm(r["prompt"]) for r in tables["prompts"] if r["dataset"] == s and r["split"] == k}
                 for k in ("ident", "eval")}
        assert split["ident"] and split["eval"] and not split["ident"] & split["eval"], s
    assert {r["label"] for r in tables["judge"]} == {0, 1}
    util = tables["utility"]
    assert {(r["dataset"], r["split"]) for r in util} == {("gsm8k", "train"), ("gsm8k", "eval"),
                                                          ("sst2", "train"), ("sst2", "eval")}
    assert all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in util if r["dataset"] == "gsm8k")
    for name in tables:
        assert read_jsonl(tmp_path / f"out/{name}.jsonl") == tables[name], name
    assert data.prompts(tmp_path / "out/prompts.jsonl", "advbench", "eval", 3) == \
        [r["prompt"] for r in tables["prompts"] if r["dataset"] == "advbench" and r["split"] == "eval"][:3]

    script = f"from saferegions import data; data.build({str(raw)!r}, {str(tmp_path / 'out2')!r}, **{kw!r})"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600, env={**os.environ, "PYTHONHASHSEED": "7"})
    for name in tables:
        assert (tmp_path / f"out/{name}.jsonl").read_bytes() == (tmp_path / f"out2/{name}.jsonl").read_bytes(), name


def test_verify_refuses_changed_data(mirror, tmp_path):
    raw = data.fetch(tmp_path / "data", mirror)
    f = raw / "advbench/harmful_behaviors.csv"
    f.chmod(0o644)
    f.write_text("goal\ntampered\n")
    with pytest.raises(ValueError, match="advbench/harmful_behaviors.csv"):
        data.verify(raw)


def test_data_stage_counts_sizes_leaks_and_categories():
    """The numbers the data stage records: prompts per set and split, eval prompts that also identify (by
    normalized text, across sets), distinct categories per safety set ('' counts as one)."""
    import pandas as pd

    from saferegions.stages import data as stage

    prompts = pd.DataFrame([
        {"id": "a0", "dataset": "advbench", "prompt": "How to X?", "category": "", "split": "ident"},
        {"id": "a1", "dataset": "advbench", "prompt": "How to Y?", "category": "", "split": "eval"},
        {"id": "h0", "dataset": "harmbench", "prompt": "Do Z", "category": "chem", "split": "ident"},
        {"id": "h1", "dataset": "harmbench", "prompt": "how to x", "category": "cyber", "split": "eval"},
        {"id": "x0", "dataset": "alpaca", "prompt": "Name a color.", "category": "", "split": "eval"}])
    sizes = stage.set_sizes(prompts)
    assert list(sizes.index) == list(data.SAFETY_SETS + data.BENIGN_SETS)
    assert sizes.loc["advbench"].to_dict() == {"eval": 1, "ident": 1} and sizes.loc["alpaca", "eval"] == 1
    assert list(stage.leaked_eval_prompts(prompts).id) == ["h1"]
    cats = stage.categories_per_set(prompts)
    assert cats["advbench"] == 1 and cats["harmbench"] == 2 and pd.isna(cats["catqa"])
