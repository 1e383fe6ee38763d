"""Fine-tuning for SET and SPA (paper 2, docs/methods.md §4.6): one small loop shared by every arm.

An *arm* is a way of choosing what may change: a masked arm trains through `optim.MaskedAdamW` (the ESI
top-k for SET, everything but the top-k for SPA, a random or bottom-k mask of the same size as controls),
`full` trains every weight with torch AdamW, `lora` trains a peft LoRA adapter on all linear layers. The
loop is the same for all of them (causal-LM loss on the supervised tokens, gradient accumulation, warmup +
cosine schedule, global grad-norm clip, seeded order), so arms differ only in what they may change.
a `Snapshot` restores the model bit-exactly after each arm, so arms are independent and one loaded model
serves them all. Under bf16 every arm trains through fp32 masters and fp32 moments (`optim.MaskedAdamW`).
A long arm checkpoints every `checkpoint_every` steps (`resume`) and a re-run resumes it.

Data: each example is (prompt, response). The reference trains on plain "Instruction: …\\nAnswer: …" text with
the loss on the whole sequence (`chat_template=False, loss_on_prompt=True`); the embedded default renders the
model's chat template and puts the loss on response tokens only (the format evaluation uses), because a
handful of CPU steps cannot also teach a format shift.

The stages `set` and `spa` (stages/set.py, stages/spa.py) run the arms and score them; the last section here
holds what both stages share: loading the model with its ESI regions, the held-out harmful prompts, judged
generation, and writing generations, metrics and loss curves.
"""
from __future__ import annotations

import contextlib
import gc
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import chat, config, data, evaluation, evidence, models, optim, resume
from . import regions as R
from .evaluation import gsm8k_exact_match, sst2_accuracy
from .io import atomic_path, write_json, write_jsonl
from .methods import removal
from .models import param_count

MASKED_ARMS = ("set", "spa", "random", "bottom", "benign_esi")
SST2_INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


# ---------------------------------------------------------------- data


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]   # -100 where no loss is taken


def encode(tokenizer, prompts: list[str], responses: list[str], max_length: int, chat_template: bool = False,
           loss_on_prompt: bool = True, system: str | None = None,
           finished: list[bool] | None = None) -> list[Example]:
    """Tokenize (prompt, response) pairs, truncated to `max_length` tokens at the end.

    chat_template=False is the reference's text format "Instruction: {prompt}\\nAnswer: {response}"; True renders
    the prompt as a user turn of the model's chat template. The response ends with the EOS token where
    `finished` (None: all, as dataset responses are) says it ended, as in `chat.response_batches`. Examples
    left with no supervised token after truncation are dropped (an error if none remain)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ends = [True] * len(responses) if finished is None else list(finished)
    if len(ends) != len(responses):
        raise ValueError(f"{len(ends)} finished flags for {len(responses)} responses")
    heads = chat.render(tokenizer, prompts, system) if chat_template else [f"Instruction: {p}\nAnswer: "
                                                                            for p in prompts]
    eos = tokenizer.eos_token or ""
    bos = [tokenizer.bos_token_id] if not chat_template and getattr(tokenizer, "add_bos_token", False) \
        and tokenizer.bos_token_id is not None else []
    out = []
    for head, resp, end in zip(heads, responses, ends):
        p_ids = bos + tokenizer(head, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(resp + (eos if end else ""), add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[:max_length]
        labels = (p_ids if loss_on_prompt else [-100] * len(p_ids)) + r_ids
        labels = labels[:max_length]
        if any(x != -100 for x in labels[1:]):   # the first position is never predicted
            out.append(Example(ids, labels))
    if not out:
        raise ValueError(f"no example keeps a supervised token within max_length={max_length}")
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels -100 on padding."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for j, e in enumerate(examples):
        n = len(e.input_ids)
        ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_stream(examples: list[Example], batch_size: int, pad_id: int, seed: int):
    """Endless batches: a seeded reshuffle per epoch, so step t sees the same data in every arm."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, max(len(order) - batch_size, 0) + 1, batch_size):   # full batches only
            yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)


def task_pairs(rows: list[dict], task: str, answer_only: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(prompts, training targets, reference answers) of GSM8K / SST-2 rows from artifacts/data/utility.jsonl.

    GSM8K: the question; target = the worked solution ending in "#### N" (or "The answer is N." with
    `answer_only`). SST-2: a one-word sentiment instruction; target = "positive" / "negative"."""
    if task == "gsm8k":
        prompts = [r["prompt"] for r in rows]
        targets = [f"The answer is {r['answer']}." if answer_only else r["response"] for r in rows]
    elif task == "sst2":
        prompts = [SST2_INSTRUCTION + r["prompt"] for r in rows]
        targets = [r["answer"] for r in rows]
    else:
        raise ValueError(f"unknown task {task!r}; valid: gsm8k, sst2")
    return prompts, targets, [r["answer"] for r in rows]


def task_score(task: str, responses: list[str], answers: list[str]) -> float:
    """GSM8K exact match of the last number / SST-2 accuracy of the first sentiment word."""
    return gsm8k_exact_match(responses, answers) if task == "gsm8k" else sst2_accuracy(responses, answers)


# ---------------------------------------------------------------- the loop


def _accumulate(model, stream, grad_accum: int, device) -> float:
    """Backward `grad_accum` micro-batches into the .grads (each loss divided by grad_accum); their summed loss."""
    total = 0.0
    for _ in range(grad_accum):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        loss = chat.response_loss(model, batch["input_ids"], batch["labels"],
                                  attention_mask=batch["attention_mask"]) / grad_accum
        loss.backward()
        total += float(loss.detach())
    return total


def first_gradients(model, examples: list[Example], batch_size: int, pad_id: int, grad_accum: int = 1,
                    seed: int = 0) -> tuple[dict[str, torch.Tensor], float] | None:
    """({param name: gradient}, loss) of the first step of `train`. Every arm that trains the base weights starts
    from the same weights on the same first batch, so its first gradient is this one whatever its mask (masks act
    on the update): computed once, it saves each such arm a forward and backward pass. None for a model on an
    accelerator: there a whole-model gradient kept beside every arm's training costs memory that limits, and a
    forward and backward pass per arm costs little, so each arm computes its own first step."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        return None
    device = models.input_device(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(seed)
    model.train()
    try:
        loss = _accumulate(model, batch_stream(examples, batch_size, pad_id, seed), grad_accum, device)
        grads = {n: p.grad for n, p in model.named_parameters()}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
        model.eval()
    return grads, loss


def train(model, optimizer, examples: list[Example], max_steps: int, batch_size: int, pad_id: int,
          grad_accum: int = 1, warmup_ratio: float = 0.0, schedule: str = "cosine", max_grad_norm: float = 0.0,
          seed: int = 0, desc: str = "train", first: tuple[dict[str, torch.Tensor], float] | None = None,
          checkpoint: Path | None = None, every: int = 0, key: dict | None = None) -> list[dict]:
    """Run `max_steps` optimizer steps of causal-LM loss; returns the curve [{step, loss, lr}].

    Each step averages `grad_accum` micro-batches of `batch_size` examples (token-mean loss per micro-batch).
    Warmup is ceil(warmup_ratio × max_steps) steps, as the HF Trainer. Gradients are clipped to
    `max_grad_norm` (0 = off) over the parameters the optimizer holds. `first` = `first_gradients(...)` of the
    same model, examples and seed: step 1 uses it instead of computing it.

    `checkpoint`: a directory to checkpoint into every `every` steps (0 = never) and to resume from; `key`
    names the run (a checkpoint with another key is not resumed). It is removed when the run completes."""
    if max_steps <= 0 or batch_size <= 0 or grad_accum <= 0:
        raise ValueError("max_steps, batch_size and grad_accum must be > 0")
    # imported here: at module import, before a model is loaded, these pull in peft and take 3 s
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
    torch.manual_seed(seed)
    warmup = math.ceil(warmup_ratio * max_steps)
    if schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
    elif schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = models.input_device(model)
    stream = batch_stream(examples, batch_size, pad_id, seed)
    start, curve = 0, []
    if checkpoint is not None:
        start, curve = resume.load(checkpoint, key or {}, params, optimizer) or (0, [])
        resume.fast_forward(scheduler, stream, start, grad_accum)
    model.train()
    try:
        for step in tqdm(range(start + 1, max_steps + 1), desc=desc, leave=False):
            optimizer.zero_grad(set_to_none=False)   # zero in place: a fresh 2 GB of gradients per step page-faults
            if step == 1 and first is not None:
                for _ in range(grad_accum):
                    next(stream)
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.grad = first[0][n].clone()
                total = first[1]
            else:
                total = _accumulate(model, stream, grad_accum, device)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            curve.append({"step": step, "loss": total, "lr": lr})
            if checkpoint is not None and every and step % every == 0 and step < max_steps:
                resume.save(checkpoint, key or {}, step, curve, params, optimizer)
        if checkpoint is not None:
            resume.remove(checkpoint)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return curve


# ---------------------------------------------------------------- arms


def region_fraction(region: R.Region, model) -> float:
    """Region size as a fraction of ALL model parameters (the ESI k = int(top_frac × all params))."""
    return region.size / param_count(model)


def check_fraction(region: R.Region, model, top_frac: float, where: str) -> None:
    """The ESI files carry the ESI stage's top_frac; training with another would silently change the arm."""
    k = int(top_frac * param_count(model))
    if abs(region.size - k) > max(1, k // 100):
        raise ValueError(f"{where}: region has {region.size} entries but top_frac={top_frac} of "
                         f"{param_count(model)} parameters is {k}; make the esi stage's top_frac match")


def masked_optimizer(model, masks: dict[str, torch.Tensor], invert: bool, cfg) -> optim.MaskedAdamW:
    """SET (invert=False): train only the mask; SPA (invert=True): freeze the mask, train everything else."""
    masks = optim.invert_masks(masks) if invert else masks
    pairs = optim.build_param_groups(model, masks, force_bias_norm=cfg.force_bias_norm, train_outside_mask=invert)
    if not pairs:
        raise ValueError("the mask leaves nothing trainable")
    return optim.MaskedAdamW(pairs, lr=cfg.lr, weight_decay=cfg.weight_decay, mode=cfg.optimizer_mode,
                             ref_decay=cfg.ref_decay)


def trainable_count(optimizer) -> int:
    """Entries the optimizer can change (MaskedAdamW counts its masks once, at construction)."""
    if isinstance(optimizer, optim.MaskedAdamW):
        return optimizer.trainable
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])


class Snapshot:
    """Every parameter's requires_grad flag, and before each arm trains (`hold`), the initial values of what
    its optimizer may change: a masked arm's trainable entries only (where the optimizer keeps a per-entry
    index), else the whole tensors it trains. Kept on the host and written back bit-exactly after the arm
    (also after an error), so arms are independent and one loaded model serves them all."""

    def __init__(self, model):
        self.model = model
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.held: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []   # (param, index, values)

    @torch.no_grad()
    def hold(self, optimizer) -> None:
        index = optimizer.index if isinstance(optimizer, optim.MaskedAdamW) else lambda p: None
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            idx = index(p)
            values = p.reshape(-1).index_select(0, idx) if idx is not None else p
            self.held.append((p, None if idx is None else idx.cpu(), values.to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        for p, idx, values in self.held:
            if idx is None:
                p.copy_(values)
            else:
                p.view(-1).index_put_((idx.to(p.device),), values.to(p.device))
        self.held = []
        for n, p in self.model.named_parameters():
            if n in self.flags:
                p.requires_grad_(self.flags[n])
                p.grad = None
        self.model.eval()


def full_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW on every weight: torch's fused kernel for fp32 weights; for bf16 / fp16 weights MaskedAdamW with
    no mask (fp32 master and moments per weight: torch's AdamW would keep bf16 moments and round each update
    into the bf16 weight) and torch's decoupled decay."""
    params = list(model.parameters())
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return optim.MaskedAdamW([(p, None) for p in params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                             ref_decay=False)


@contextlib.contextmanager
def lora_attached(model, r: int, alpha: float, dropout: float, seed: int = 0):
    """A peft LoRA on every linear layer (lm_head excluded); base weights frozen; removed on exit."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    try:
        yield peft_model
    finally:
        peft_model.unload()   # drops the adapters without merging: the base weights are as before


@contextlib.contextmanager
def arm(model, name: str, cfg, masks: dict[str, torch.Tensor] | None = None, invert: bool = False,
        seed: int = 0, snapshot: Snapshot | None = None):
    """Yield (model to train and evaluate, optimizer) for one arm; the model is restored on exit.

    name: 'full' (AdamW, every weight: `full_optimizer`), 'lora' (torch's fused AdamW on the adapter, which
    peft keeps in fp32; the base weights stay frozen) or a masked arm (MaskedAdamW on `masks`, inverted for
    SPA)."""
    snapshot = snapshot or Snapshot(model)
    try:
        if name == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            opt = full_optimizer(model, cfg)
            snapshot.hold(opt)
            yield model, opt
        elif name == "lora":
            with lora_attached(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed) as peft_model:
                params = [p for p in peft_model.parameters() if p.requires_grad]
                yield peft_model, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                    fused=True)
        elif name in MASKED_ARMS:
            if masks is None:
                raise ValueError(f"arm {name!r} needs masks")
            for p in model.parameters():
                p.requires_grad_(True)
            opt = masked_optimizer(model, masks, invert, cfg)
            snapshot.hold(opt)
            yield model, opt
        else:
            raise ValueError(f"unknown arm {name!r}; valid: full, lora, {', '.join(MASKED_ARMS)}")
    finally:
        snapshot.restore()


def run_arm(model, name: str, cfg, examples: list[Example], pad_id: int, evaluate, masks=None,
            invert: bool = False, seed: int = 0, snapshot: Snapshot | None = None,
            first: tuple[dict[str, torch.Tensor], float] | None = None,
            checkpoint: Path | None = None) -> tuple[list[dict], dict]:
    """Train one arm with `cfg`'s recipe, call `evaluate(trained_model)` inside the arm, restore the model.
    `first`: the shared first-step gradients (`first_gradients`), used by every arm but LoRA. `checkpoint`:
    this arm's resume directory (every `cfg.checkpoint_every` steps; see `train`).

    Returns (loss curve, {trainable, trainable_fraction, **evaluate's dict})."""
    total = param_count(model)
    if not 0 < cfg.checkpoint_every < cfg.max_steps:
        checkpoint = None   # no checkpoint would be written
    with arm(model, name, cfg, masks, invert, seed, snapshot) as (m, opt):
        n = trainable_count(opt)
        curve = train(m, opt, examples, cfg.max_steps, cfg.batch_size, pad_id, cfg.grad_accum,
                      cfg.warmup_ratio, cfg.schedule, cfg.max_grad_norm, seed, desc=f"train {name}",
                      first=None if name == "lora" else first, checkpoint=checkpoint, every=cfg.checkpoint_every,
                      key=resume.run_key(name, cfg, seed, examples, masks, m) if checkpoint else None)
        result = {"trainable": n, "trainable_fraction": n / total, **evaluate(m)}
        del opt
    gc.collect()   # free this arm's moments before the next arm allocates its own (0.5B: 5 GB each)
    return curve, result


# ---------------------------------------------------------------- shared by the set and spa stages


def load_tuning(cfg, s, esi_dir: Path, top_arm: str, bottom: bool = False):
    """(model, tokenizer, {arm: region}) of a tuning stage: the `s.model` model and its ESI regions (stage `esi`).

    Arms: `top_arm` = the ESI top-k (its size checked against `s.top_frac`: a file from another top_frac would
    silently change the arm), "random" = a random region matched to it (`s.random_mode`), "bottom" = the ESI
    bottom-k where `bottom`. Seeds torch with `cfg.run.seed` first and prints the top-k's provenance."""
    torch.manual_seed(cfg.run.seed)
    model, tok = models.load(cfg.models[s.model].entry(), dtype=cfg.run.dtype, device=cfg.run.device)
    top = R.load(esi_dir / "topk.safetensors")
    check_fraction(top, model, s.top_frac, str(esi_dir / "topk.safetensors"))
    print("top-k provenance (esi stage):", provenance(top))
    arms = {top_arm: top, "random": removal.random_control(model, top, cfg.run.seed, s.random_mode)}
    if bottom:
        arms["bottom"] = R.load(esi_dir / "bottomk.safetensors")
    return model, tok, arms


def deviations(s, name: str):
    """The params section `name`'s values that differ from paper scale, as a captioned table to show."""
    import pandas as pd   # imported here: the training loop does not need pandas
    return pd.DataFrame(config.deviations(s, name)).style.set_caption(
        "CPU reductions and project choices in this run (paper-scale / reference value beside each)")


def provenance(region: R.Region) -> dict:
    """What the ESI stage recorded about a region, without the long reference text."""
    return {k: v for k, v in region.meta.items() if k != "reference"}


def region_table(arms: dict[str, R.Region], model) -> dict[str, dict]:
    """{arm: entries, fraction of all parameters, tensors touched}: what each mask covers."""
    return {arm: {"entries": r.size, "fraction of all parameters": region_fraction(r, model),
                  "tensors touched": sum(bool(m.any()) for m in r.masks.values())} for arm, r in arms.items()}


def harmful_sets(prompts_path, s) -> dict[str, list[str]]:
    """{set: its first `s.n_eval` eval-split prompts}: the held-out harmful prompts ASR is measured on."""
    return {d: data.prompts(prompts_path, d, "eval", s.n_eval) for d in s.eval_sets}


def _norm(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def disjoint(pairs: list[dict], held_out: list[str]) -> list[dict]:
    """Training pairs whose prompt is not (up to case and punctuation) one of the evaluation prompts."""
    banned = {_norm(p) for p in held_out}
    return [r for r in pairs if _norm(r["prompt"]) not in banned]


def generate_sets(model, tok, sets: dict[str, list[str]], judge, max_new_tokens: int, batch_size: int,
                  system: str | None, desc: str) -> list[dict]:
    """One batched greedy generation over every set; rows {dataset, prompt, response, complied, finished}
    (finished: the model ended the response, see `chat.generate`)."""
    prompts = [p for ps in sets.values() for p in ps]
    names = [n for n, ps in sets.items() for _ in ps]
    if not prompts:
        return []
    responses, finished = chat.generate(model, tok, prompts, max_new_tokens, batch_size, system, desc=desc,
                                        with_finished=True)
    found = evaluation.outcomes(responses, judge, prompts)   # degenerate text never counts as compliance
    return [{"dataset": n, "prompt": p, "response": r, "outcome": o.value,
             "complied": o == evaluation.Outcome.COMPLIED, "finished": f}
            for n, p, r, o, f in zip(names, prompts, responses, found, finished)]


def outcome_array(rows: list[dict], sets, outcome: str = "complied") -> list[bool]:
    """Per row of `sets`, in row order (the same prompts in every arm: paired), whether its outcome is `outcome`."""
    return [r["outcome"] == outcome for r in rows if r["dataset"] in sets]


def rate_fields(rows: list[dict], sets, suffix: str) -> dict:
    """asr_<suffix>, asr_<suffix>_ci (Wilson), degenerate_rate_<suffix> and its CI on the rows of `sets`."""
    asr, deg = evidence.proportion(outcome_array(rows, sets)), evidence.proportion(outcome_array(rows, sets,
                                                                                                 "degenerate"))
    return {f"asr_{suffix}": asr.effect, f"asr_{suffix}_ci": list(asr.ci),
            f"degenerate_rate_{suffix}": deg.effect, f"degenerate_rate_{suffix}_ci": list(deg.ci)}


def compliance_rate(rows: list[dict], sets) -> float:
    """Share of complied rows among those of `sets` (NaN if none): ASR on harmful sets, 1 − refusal on benign."""
    picked = [r["complied"] for r in rows if r["dataset"] in sets]
    return sum(picked) / len(picked) if picked else float("nan")


def save_outputs(out: Path, results: Path, metrics: dict, curves: list[dict], gens: list[dict], keys: list[str],
                 title: str, loss_on_prompt: bool) -> None:
    """Write a tuning stage's files: generations, metrics.json, one loss-curve CSV per run (DVC plots, named by
    the run's `keys` values joined by "-") and the loss-curve figure (one line per run)."""
    import pandas as pd   # imported here: the training loop needs neither pandas nor matplotlib (plots)

    from . import plots
    write_jsonl(out / "generations.jsonl", gens)
    write_json(results / "metrics.json", metrics)
    curve = pd.DataFrame(curves)
    for values, c in curve.groupby(keys if len(keys) > 1 else keys[0]):
        name = "-".join(values) if len(keys) > 1 else values
        with atomic_path(results / "curves" / f"{name}.csv") as tmp:
            c[["step", "loss", "lr"]].to_csv(tmp, index=False)
    hue = keys[0]
    if len(keys) > 1:
        hue, curve["run"] = "run", curve[keys].agg(" / ".join, axis=1)
    fig = plots.lines(curve, "step", "loss", hue, title, "optimizer step",
                      "loss (" + ("response tokens" if not loss_on_prompt else "whole sequence") + ")")
    plots.save(fig, results / "figures" / "loss_curves.png")
