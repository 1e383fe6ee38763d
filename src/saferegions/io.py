"""Atomic artifact writes and hashing: an interrupted stage never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_memo_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saferegions" / "sha256.json"


def sha256_file_memo(path: str | Path) -> str:
    """`sha256_file`, remembered per file by (size, mtime, inode) as DVC does: every stage verifies the 2 GB model
    folder before loading it, and re-hashing an unchanged file cost ~2 s each time. Any write changes the key."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = [st.st_size, st.st_mtime_ns, st.st_ino]
    memo_file = hash_memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(real, {}).get("key") == key:
        return memo[real]["sha256"]
    digest = sha256_file(real)
    memo[real] = {"key": key, "sha256": digest}
    try:
        with atomic_path(memo_file) as tmp:
            tmp.write_text(json.dumps(memo))
    except OSError:
        pass   # a read-only home only costs the re-hash next time
    return digest


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling path; rename it onto `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=f".{path.name}", dir=path.parent)  # keeps the extension
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling directory; it replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def undefined_as_none(obj):
    """`obj` with every NaN / infinite float replaced by None: an undefined statistic (an interval over no
    prompts, an AUROC with one class) is null in JSON, which other tools read, where NaN is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: undefined_as_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [undefined_as_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    """Strict JSON: undefined values (NaN, inf) are written as null, and anything else JSON cannot hold is
    refused."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(undefined_as_none(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


METADATA_KEY = "saferegions"


def canonical_metadata(header: dict) -> dict[str, str]:
    """Safetensors metadata as one sorted JSON string under one key: safetensors writes a metadata map in a
    per-process order, so several keys made the same artifact a different file in each process (and DVC re-ran
    everything downstream)."""
    return {METADATA_KEY: json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)}


def read_canonical_metadata(handle) -> dict:
    """The header `canonical_metadata` wrote, from an open `safetensors.safe_open` handle ({} if absent)."""
    return json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
