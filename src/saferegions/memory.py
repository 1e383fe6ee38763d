"""Per-stage memory accounting for `saferegions.plan`: what each stage holds at its peak, in bytes.

A stage part (one model role, method or arm) runs in phases (loading, scoring, training, generating); its peak is
the largest phase. Each phase lists what it holds, by category, on the device and on the host. On a CPU run the
device is the host: both add up, except host copies of a device buffer (`.cpu()` of a CPU tensor is no copy).

The activation model counts what autograd saves per token and decoder layer (the residual stream and RMSNorm
outputs, queries, keys/values, attention output, FFN gate/up/activation/product; fp32 norm copies under a 16-bit
dtype) and the vocabulary-sized logits of the loss positions (model dtype + fp32 upcast + log-softmax); the
coefficients are checked against measured CPU peaks by tests/test_plan.py; a forward without gradients holds one
layer's intermediates; generation adds the KV cache.

Under FSDP2 full sharding (`run.distributed: fsdp`, `distributed.shard`) each phase's device bytes split in two
(`Phase.fsdp`): what is sharded over the ranks (`SHARDED`: weights, gradients, optimizer state, fp32 score
accumulators, masks) and what every rank holds whole (`WHOLE`: activations incl. the KV cache, the judge, which is
replicated; plus the parameters FSDP2 all-gathers: the root unit (embeddings, final norm, lm_head), unsharded from
forward through backward, and `GATHERED_BLOCKS` decoder blocks: the one running and the one prefetched, and in a
phase with a backward one more for the running block's unsharded gradient before its reduce-scatter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import methods

CATEGORIES = ("weights", "grads", "optimizer", "scores", "activations", "masks", "judge")
SHARDED = ("weights", "grads", "optimizer", "scores", "masks")   # FSDP2 divides these by the ranks
WHOLE = ("activations", "judge")                                 # every rank holds these whole
GATHERED_BLOCKS = 2      # decoder blocks all-gathered at once (running + prefetched); +1 in a backward
PROMPT_TOKENS = 256      # longest rendered prompt assumed for generation (chat template + system + request)
GUARD_TEMPLATE = 320     # Llama Guard's instruction around the response, in tokens
INDEX_BYTES = 8          # int64 flat index of a masked entry (optim.MaskedAdamW's default index dtype)
MASK_BYTES = 1           # a bool mask entry, where a tensor's state is kept dense
FP32 = 4
GB = 1e9


@dataclass
class Phase:
    name: str
    items: list = field(default_factory=list)   # (category, device bytes, host bytes, host copy of device buffer)
    root: float = 0.0    # bytes of the model's FSDP2 root unit (embeddings, final norm, lm_head)
    block: float = 0.0   # bytes of its largest decoder block

    def add(self, category: str, device: float = 0, host: float = 0, copy: bool = False) -> "Phase":
        assert category in CATEGORIES, category
        self.items.append((category, float(device), float(host), copy))
        return self

    def totals(self, on_gpu: bool) -> tuple[dict, dict]:
        dev, host = dict.fromkeys(CATEGORIES, 0.0), dict.fromkeys(CATEGORIES, 0.0)
        for cat, d, h, copy in self.items:
            if on_gpu:
                dev[cat] += d
                host[cat] += h
            else:
                host[cat] += d + (0 if copy else h)
        return dev, host

    def fsdp(self) -> tuple[float, float]:
        """(sharded, whole) device bytes of this phase on each FSDP2 rank before dividing by the ranks (module
        docstring): a rank holds sharded / N + whole."""
        dev = self.totals(on_gpu=True)[0]
        blocks = GATHERED_BLOCKS + (1 if dev["grads"] else 0)
        return sum(dev[c] for c in SHARDED), sum(dev[c] for c in WHOLE) + self.root + blocks * self.block


def row(stage: str, part: str, phases: list[Phase], on_gpu: bool) -> dict:
    """The peak phase's breakdown (of the GPU on a GPU run, else of the host) and both peaks, in GB."""
    totals = [(p.name, *p.totals(on_gpu)) for p in phases]
    main = 1 if on_gpu else 2
    name, *peak = max(totals, key=lambda t: sum(t[main].values()))
    return {"stage": stage, "part": part, "phase": name,
            "device": {c: round(v / GB, 3) for c, v in peak[main - 1].items()},
            "device_gb": round(max(sum(t[1].values()) for t in totals) / GB, 3) if on_gpu else 0.0,
            "host_gb": round(max(sum(t[2].values()) for t in totals) / GB, 3),
            "fsdp": [[round(x / GB, 3) for x in p.fsdp()] for p in phases] if on_gpu else []}


# ---------------------------------------------------------------- activations (bytes)


def train_activations(s, tokens: int, loss_tokens: int, b: int) -> float:
    """Saved for backward through every layer, plus the loss positions' logits."""
    upcast = 4 * s.hidden * FP32 if b < FP32 else 0    # RMSNorm's fp32 input and output, twice per layer
    per_token_layer = b * (4 * s.hidden + s.q_dim + s.kv_dim + 4 * s.ffn) + upcast
    return tokens * (s.layers * per_token_layer + 2 * b * s.hidden) + loss_tokens * s.vocab * (b + 2 * FP32)


def forward_activations(s, tokens: int, logit_tokens: int, b: int) -> float:
    """One layer's intermediates of a forward without gradients, plus the kept logits."""
    return tokens * b * (3 * s.hidden + s.q_dim + 2 * s.kv_dim + 3 * s.ffn) + logit_tokens * s.vocab * FP32


def kv_cache(s, batch: int, length: int, b: int) -> float:
    return 2 * s.layers * s.kv_dim * batch * length * b


def generation(s, batch: int, new_tokens: int, b: int, prompt: int = PROMPT_TOKENS) -> float:
    return kv_cache(s, batch, prompt + new_tokens, b) + forward_activations(s, batch * prompt, batch, b)


# ---------------------------------------------------------------- stages


def dtype_bytes(cfg, on_gpu: bool) -> int:
    dtype = cfg.run.dtype
    if dtype == "auto":
        return 2 if on_gpu else FP32
    return FP32 if dtype == "float32" else 2


def loaded(s, b: int, on_gpu: bool) -> Phase:
    """from_pretrained reads the weights into host memory, then `.to(device)` moves them."""
    p = resident(s, b, "load")
    if on_gpu:
        p.add("weights", host=s.params * b)
    return p


def resident(s, b: int, name: str) -> Phase:
    return Phase(name, root=s.root * b, block=s.block * b).add("weights", device=s.params * b)


def packed(numel: int, count: int = 1) -> float:
    """Host bytes of `count` regions over `numel` entries, packed one bit per entry."""
    return count * numel / 8


def generate_part(stage, part, s, b, batch, new_tokens, on_gpu, judge_host: float = 0) -> dict:
    gen = resident(s, b, "generate").add("activations", device=generation(s, batch, new_tokens, b))
    if judge_host:
        gen.add("judge", host=judge_host)
    return row(stage, part, [loaded(s, b, on_gpu), gen], on_gpu)


def snip(p: Phase, s, b: int, tokens: int) -> Phase:
    """SNIP: one sample at a time, backward through the model, one gradient alive at a time, fp32 scores."""
    p.add("scores", device=s.eligible * FP32).add("scores", host=s.eligible * FP32, copy=True)
    return p.add("grads", device=s.largest * b).add("activations", device=train_activations(s, tokens, tokens, b))


def backward(p: Phase, s, b: int, activations: float, grads: float) -> Phase:
    """A training step's backward: gradients appear layer by layer as that layer's saved activations are freed,
    so its peak holds the larger of the two (plus the gradient being written)."""
    return p.add("activations", device=activations).add("grads", device=s.largest * b + max(0, grads - activations))


def full_arm(p: Phase, s, b: int, tokens: int) -> Phase:
    """Full fine-tuning: every gradient alive at the step, two fp32 AdamW moments of every weight and, under a
    16-bit dtype, its fp32 master copy."""
    backward(p, s, b, train_activations(s, tokens, tokens, b), s.params * b)
    return p.add("optimizer", device=s.params * ((FP32 if b < FP32 else 0) + 2 * FP32))


def snip_phase(p: Phase, cfg, s, b: int) -> None:
    snip(p, s, b, cfg.identify.max_length)


def wanda_phase(p: Phase, cfg, s, b: int) -> None:
    c = cfg.identify
    p.add("scores", host=s.eligible * FP32).add("scores", device=s.largest * FP32)
    p.add("activations", device=forward_activations(s, c.batch_size * c.max_length, c.batch_size, b))


def nlsr_phase(p: Phase, cfg, s, b: int) -> None:
    n = cfg.identify.nlsr
    lora = n.lora_r * s.linear_io
    p.add("optimizer", device=lora * 3 * FP32).add("grads", device=lora * FP32)
    p.add("activations", device=train_activations(s, n.batch_size * n.max_length, n.batch_size * n.max_length, b))


def _hooked_forwards(p: Phase, cfg, s, b: int) -> None:
    """Safety neurons and SafeLayer: forward passes with hooks, and short generations."""
    c = cfg.identify
    p.add("activations", device=max(forward_activations(s, c.batch_size * c.max_length, c.batch_size, b),
                                    generation(s, cfg.calibrate.batch_size, cfg.calibrate.max_new_tokens, b)))


def identify_parts(cfg, role: str, s, b: int, on_gpu: bool) -> list[dict]:
    c = cfg.identify
    held = 3 + len(c.pq_grid_p or []) + len(c.pq_grid_q or [])   # utility, raw, refined + the p/q sweep's regions
    masks = packed(s.eligible, held)
    out = []
    for method in c.methods:
        p = resident(s, b, method).add("masks", host=masks)
        methods.resolve(methods.get(method).memory_phase or _hooked_forwards)(p, cfg, s, b)
        out.append(row("identify", f"{role} {method}", [loaded(s, b, on_gpu), p], on_gpu))
    return out


def n_regions(cfg, method: str) -> int:
    """raw + refined per dataset, and the utility region."""
    return 2 * len(cfg.identify.datasets(method, cfg.calibrate.datasets)) + 1


def esi_phase(p: Phase, s, guard, b: int, new_tokens: int, prompt: int = PROMPT_TOKENS) -> Phase:
    """ESI gradients of one prompt: fp32 Σ-gradient buffers, backward through the target over prompt + response,
    the response's fp32 (Gumbel-)softmax and transferred judge gradient, and the judge (frozen weights, backward
    to its soft input tokens over the response and its template)."""
    T = prompt + new_tokens
    p.add("scores", device=s.esi * FP32).add("grads", device=s.largest * b)
    p.add("scores", host=2 * s.esi * FP32, copy=True)   # Σ grad on host, then |g|·σ
    p.add("activations", device=train_activations(s, T, new_tokens, b) + new_tokens * s.vocab * FP32)
    if guard is not None:
        G = new_tokens + GUARD_TEMPLATE
        p.add("judge", device=guard.params * b + train_activations(guard, G, 1, b) + new_tokens * guard.vocab * FP32)
    return p


def masked_arm(p: Phase, s, b: int, tokens: int, trainable: int) -> Phase:
    """A masked arm as `optim.MaskedAdamW` keeps it under a 16-bit dtype: an fp32 master copy and two fp32 moments
    per trainable entry with its int64 index, or the same state dense plus a bool mask where that is smaller
    (trainable density above 0.6). Every trained tensor's gradient is alive at the step: the global gradient-norm
    clip needs the whole summed gradient."""
    state = (FP32 if b < FP32 else 0) + 2 * FP32
    p.add("optimizer", device=min(trainable * (state + INDEX_BYTES), s.params * (state + MASK_BYTES)))
    return backward(p, s, b, train_activations(s, tokens, tokens, b), s.params * b)


def esi_parts(cfg, shapes: dict, b: int, on_gpu: bool) -> list[dict]:
    e = cfg.esi
    guard = shapes.get("judges.llama_guard") if "guard" in e.judges else None
    out = []
    for role in e.models:
        s = shapes[role]
        p = esi_phase(resident(s, b, "gradients"), s, guard, b, e.max_new_tokens)
        n_specs = 2 + (len(e.judges) - 1) + (len(e.objectives) - 1) + len(e.datasets or [])
        p.add("masks", host=packed(s.esi, n_specs + 2))
        gen = resident(s, b, "perturb").add("activations",
                                            device=generation(s, e.perturb_batch_size, e.perturb_max_new_tokens, b))
        phases = [loaded(s, b, on_gpu), p, gen]
        if guard is not None:
            gen.add("judge", device=guard.params * b)
        out.append(row("esi", role, phases, on_gpu))
    return out


def tune_parts(stage: str, cfg, s, b: int, on_gpu: bool) -> list[dict]:
    """SET / SPA arms, one after another on one loaded model (`masked_arm`, `full_arm`; LoRA adapts every
    linear), then the evaluation generations."""
    t = getattr(cfg, stage)
    T = t.batch_size * t.max_length
    k = int(t.top_frac * s.params)
    acts = train_activations(s, T, T, b)
    phases = [loaded(s, b, on_gpu)]
    rows = []
    for arm in t.arms:
        p = resident(s, b, arm).add("masks", host=packed(s.esi, 3))
        if arm in ("full", "erode"):   # erode: full fine-tuning on a harmful mix (SPA positive control)
            full_arm(p, s, b, T)
        elif arm == "lora":
            lora = t.lora_r * s.linear_io
            p.add("optimizer", device=lora * 3 * FP32).add("grads", device=lora * FP32).add("activations", device=acts)
        else:
            masked_arm(p, s, b, T, s.params - k if stage == "spa" else k)
        rows.append(row(stage, f"{t.model} {arm}", [*phases, p], on_gpu))
    gen = resident(s, b, "evaluate").add("activations", device=generation(s, t.eval_batch_size, t.max_new_tokens, b))
    rows.append(row(stage, f"{t.model} evaluate", [*phases, gen], on_gpu))
    return rows


def rows(cfg, shapes: dict, on_gpu: bool) -> list[dict]:
    """Every stage part of the params, in pipeline order."""
    b = dtype_bytes(cfg, on_gpu)
    enc = shapes.get(cfg.judges.learned.encoder)
    enc_host = enc.params * FP32 * 2 if enc else 0   # the learned judge's encoder, fp32 on CPU, and its inputs
    out = []
    for role in cfg.baseline.models:
        out.append(generate_part("baseline", role, shapes[role], b, cfg.baseline.batch_size,
                                 cfg.baseline.max_new_tokens, on_gpu, enc_host))
    for role in cfg.identify.models:
        out.append(generate_part("calibrate", role, shapes[role], b, cfg.calibrate.batch_size,
                                 cfg.calibrate.max_new_tokens, on_gpu))
    for role in cfg.identify.models:
        out += identify_parts(cfg, role, shapes[role], b, on_gpu)
    every = sum(packed(shapes[r].eligible, n_regions(cfg, m)) for r in cfg.identify.models for m in cfg.identify.methods)
    biggest = max(cfg.identify.models, key=lambda r: shapes[r].params)
    ov = resident(shapes[biggest], b, "overlap").add("masks", host=every)
    out.append(row("overlap", "all regions", [ov], on_gpu))
    v = cfg.validate
    for role in cfg.identify.models:
        s = shapes[role]
        p = resident(s, b, "validate").add("activations", device=generation(s, v.batch_size, v.max_new_tokens, b))
        p.add("masks", host=packed(s.eligible, 2 * len(v.datasets)))
        out.append(row("validate", role, [loaded(s, b, on_gpu), p], on_gpu))
    out += esi_parts(cfg, shapes, b, on_gpu)
    out += tune_parts("set", cfg, shapes[cfg.set.model], b, on_gpu)
    out += tune_parts("spa", cfg, shapes[cfg.spa.model], b, on_gpu)
    return out
