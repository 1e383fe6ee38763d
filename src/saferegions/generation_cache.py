"""A content-addressed store of generations, asked before every batch `chat.generate` would run.

An entry's key is what determines the tokens: the model as it is now (`model_identity`: a hash of the exact bytes
of every parameter and buffer, after any mask, ablation or perturbation, with the config and generation config),
the names of active hook-based edits (`edit`: hooks change no weight, so their callers name them), the prompt's token
ids (chat template and system prompt included) and the decoding settings. A model with forward hooks and no named
edit is never cached.

- Greedy: one entry per prompt, stored with up to the longest length asked. A request for L new tokens is served by
  an entry with at least L tokens (cut to L) or one that stopped (EOS) within L; otherwise the prompt's batch is
  generated and the new answers replace the shorter ones. A batch is generated whole, as without the store, so a
  miss computes exactly what it computed before; its cached rows still answer with their stored tokens.
- Sampling: the random stream runs across a call's batches, so the key is the whole call (every prompt in order,
  batch size, seed, settings) and it is stored only once complete.

Values are token ids, the decoded text and whether generation stopped: any judge can re-judge them without
generating. One JSON file per condition (model identity, edits, settings), rewritten atomically after each
generated batch, so an interrupted stage keeps what it finished and never leaves a half-written file.

The store in use is `use(path)`'s, else the folder named by $SAFEREGIONS_GENERATIONS (set by `saferegions.stage`
for each stage: artifacts/generations/<stage>), else none.

torch is imported where used: the stage runner imports this module for `ENV` only.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

from .io import atomic_path

ENV = "SAFEREGIONS_GENERATIONS"
READ_ENV = "SAFEREGIONS_GENERATIONS_READ"
"""Other stores (os.pathsep-separated) whose entries this one may answer with, read-only: upstream stages'."""
_UNSET = object()
_STORE: contextvars.ContextVar = contextvars.ContextVar("generation_store", default=_UNSET)
_EDITS: contextvars.ContextVar = contextvars.ContextVar("generation_edits", default=())


@dataclass(frozen=True)
class Decoding:
    """The settings that decide a generation, besides model and prompt."""
    max_new_tokens: int
    do_sample: bool = False
    seed: int | None = None                          # sampling only
    batch_size: int | None = None                    # sampling only: the random stream runs across batches
    sample: dict = field(default_factory=dict)       # sampling kwargs (temperature, top_p, ...)


def digest(obj) -> str:
    """sha256 of `obj` as sorted JSON (a name for what an edit did)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_digest(t) -> str:
    """xxh3-128 of the tensor's exact bytes: ~10 GB/s on one core, against ~1 GB/s for sha256."""
    import torch
    return xxhash.xxh3_128_hexdigest(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)


def model_identity(model) -> str | None:
    """A hash of the model as it computes now: class, config, generation config, and every parameter's and
    buffer's name, dtype, shape and exact bytes; None when some weight is offloaded (on the meta device). Exact
    bytes, not a sample: one changed weight must change it. 0.5 s for Qwen2.5-Coder-0.5B's 630M fp32 parameters
    (2.5 GB) on 2 cores (sha256: 4 s), once per `chat.generate` call."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    if any(t.device.type == "meta" for _, t in tensors):
        return None
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    gen = {k: v for k, v in model.generation_config.to_dict().items() if k != "transformers_version"}
    return digest([type(model).__name__, config, gen,
                   [(n, str(t.dtype), list(t.shape), _tensor_digest(t)) for n, t in tensors]])


def _has_hooks(model) -> bool:
    from torch.nn.modules import module as M
    if M._global_forward_hooks or M._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@contextlib.contextmanager
def use(path: str | Path | None):
    """Generations inside the block use the store at `path` (None: no store)."""
    token = _STORE.set(None if path is None else Path(path))
    try:
        yield
    finally:
        _STORE.reset(token)


@contextlib.contextmanager
def edit(name: str):
    """Name a hook-based edit (an activation ablation) for the keys of generations inside the block: without a
    name, a model with hooks is never cached."""
    token = _EDITS.set(_EDITS.get() + (str(name),))
    try:
        yield
    finally:
        _EDITS.reset(token)


def store_path() -> Path | None:
    """`use`'s store where one is set (None included), else $SAFEREGIONS_GENERATIONS, else none."""
    path = _STORE.get()
    if path is not _UNSET:
        return path
    env = os.environ.get(ENV)
    return Path(env) if env else None


class _Condition:
    """One condition's file: {"condition": what it is, "rows": {key: {"tokens", "text", "stopped"}}}. The same
    condition's file in a read-only store ($SAFEREGIONS_GENERATIONS_READ) fills the keys this one lacks."""

    def __init__(self, path: Path, condition: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"condition": condition, "rows": {}}
        for other in filter(None, os.environ.get(READ_ENV, "").split(os.pathsep)):
            if (Path(other) / path.name).exists():
                rows = json.loads((Path(other) / path.name).read_text())["rows"]
                self.data["rows"] = {**rows, **self.data["rows"]}

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, ensure_ascii=False, separators=(",", ":")))


class Lookup:
    """The store's answers for one `chat.generate` call: `get(batch)` before a batch, `put(batch, new rows)` after
    generating it. Without a store every row misses and nothing is written."""

    def __init__(self, model, tokenizer, prompt_ids: list[list[int]], decoding: Decoding):
        self.tokenizer, self.decoding = tokenizer, decoding
        self.file = None
        path = store_path()
        edits = _EDITS.get()
        if path is None or (_has_hooks(model) and not edits):
            return
        identity = model_identity(model)
        if identity is None:
            return
        ids = model.generation_config.eos_token_id
        self.stop = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        settings = asdict(decoding)
        if decoding.do_sample:      # the whole call is one entry
            settings["prompts"] = digest(prompt_ids)
            self.keys = [str(i) for i in range(len(prompt_ids))]
        else:                       # one entry per prompt, any length
            settings.pop("max_new_tokens")
            self.keys = [digest(p) for p in prompt_ids]
        import torch
        import transformers
        condition = {"model": identity, "edits": list(edits), "decoding": settings,
                     "software": {"torch": torch.__version__, "transformers": transformers.__version__}}
        self.file = _Condition(Path(path) / f"{digest(condition)}.json", condition)
        self.pending = {}

    def get(self, batch: list[int]) -> list[list[int] | None]:
        """Per row of `batch` (indices into the call's prompts): the stored new tokens, or None to generate."""
        if self.file is None:
            return [None] * len(batch)
        rows = self.file.data["rows"]
        n = self.decoding.max_new_tokens
        found = []
        for i in batch:
            e = rows.get(self.keys[i])
            ok = e is not None and (self.decoding.do_sample or len(e["tokens"]) >= n or e["stopped"])
            found.append(e["tokens"][:n] if ok else None)
        return found

    def put(self, batch: list[int], new: list[list[int]]) -> None:
        """Store the rows of a generated batch that missed (cut after their stop token; the padding after it is
        not the model's) and write the file; sampled rows wait until the whole call is there."""
        if self.file is None:
            return
        missed = [(i, row) for i, row, f in zip(batch, new, self.get(batch)) if f is None]
        for i, row in missed:
            end = next((j + 1 for j, t in enumerate(row) if t in self.stop), len(row))
            tokens = list(row[:end])
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            self.pending[self.keys[i]] = {"tokens": tokens, "text": text,
                                          "stopped": bool(tokens) and tokens[-1] in self.stop}
        if self.decoding.do_sample and len(self.pending) < len(self.keys):
            return
        self.file.data["rows"].update(self.pending)
        self.pending = {}
        self.file.save()
