"""Fine-tuning for SET and SPA (paper 2, docs/methods.md §4.6): one small loop shared by every arm.

An *arm* is a way of choosing what may change: a masked arm trains through `optim.MaskedAdamW` (the ESI
top-k for SET, everything but the top-k for SPA, a random or bottom-k mask of the same size as controls),
`full` trains every weight with torch AdamW, `lora` trains a peft LoRA adapter on all linear layers. The
loop is the same for all of them (causal-LM loss on the supervised tokens, gradient accumulation, warmup +
cosine schedule, global grad-norm clip, seeded order), so arms differ only in what they may change.
a `Snapshot` restores the model bit-exactly after each arm, so arms are independent and one loaded model
serves them all.

Data: each example is (prompt, response). The reference trains on plain "Instruction: …\\nAnswer: …" text with
the loss on the whole sequence (`chat_template=False, loss_on_prompt=True`); the embedded default renders the
model's chat template and puts the loss on response tokens only (the format evaluation uses), because a
handful of CPU steps cannot also teach a format shift.
"""
from __future__ import annotations

import contextlib
import gc
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import chat, optim
from . import regions as R
from .evaluate import gsm8k_exact_match, sst2_accuracy
from .models import param_count

MASKED_ARMS = ("set", "spa", "random", "bottom")
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
                    seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """({param name: gradient}, loss) of the first step of `train`. Every arm that trains the base weights starts
    from the same weights on the same first batch, so its first gradient is this one whatever its mask (masks act
    on the update): computed once, it saves each such arm a forward and backward pass."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(seed)
    model.train()
    try:
        loss = _accumulate(model, batch_stream(examples, batch_size, pad_id, seed), grad_accum,
                           next(model.parameters()).device)
        grads = {n: p.grad for n, p in model.named_parameters()}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
        model.eval()
    return grads, loss


def train(model, optimizer, examples: list[Example], max_steps: int, batch_size: int, pad_id: int,
          grad_accum: int = 1, warmup_ratio: float = 0.0, schedule: str = "cosine", max_grad_norm: float = 0.0,
          seed: int = 0, desc: str = "train", first: tuple[dict[str, torch.Tensor], float] | None = None
          ) -> list[dict]:
    """Run `max_steps` optimizer steps of causal-LM loss; returns the curve [{step, loss, lr}].

    Each step averages `grad_accum` micro-batches of `batch_size` examples (token-mean loss per micro-batch).
    Warmup is ceil(warmup_ratio × max_steps) steps, as the HF Trainer. Gradients are clipped to
    `max_grad_norm` (0 = off) over the parameters the optimizer holds. `first` = `first_gradients(...)` of the
    same model, examples and seed: step 1 uses it instead of computing it."""
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
    device = params[0].device
    stream = batch_stream(examples, batch_size, pad_id, seed)
    curve = []
    model.train()
    try:
        for step in tqdm(range(1, max_steps + 1), desc=desc, leave=False):
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
    """Every parameter and its requires_grad flag, taken once and restored after each arm (also after an
    error), so arms are independent and one copy of the weights serves them all."""

    def __init__(self, model):
        self.model = model
        self.saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self.saved:
                p.copy_(self.saved[n])
                p.requires_grad_(self.flags[n])
                p.grad = None
        self.model.eval()


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

    name: 'full' (torch AdamW, every weight), 'lora' (AdamW on the adapter) — both fused, one pass per step —
    or a masked arm (MaskedAdamW on `masks`, inverted for SPA)."""
    snapshot = snapshot or Snapshot(model)
    try:
        if name == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            yield model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=True)
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
            yield model, masked_optimizer(model, masks, invert, cfg)
        else:
            raise ValueError(f"unknown arm {name!r}; valid: full, lora, {', '.join(MASKED_ARMS)}")
    finally:
        snapshot.restore()


def run_arm(model, name: str, cfg, examples: list[Example], pad_id: int, evaluate, masks=None,
            invert: bool = False, seed: int = 0, snapshot: Snapshot | None = None,
            first: tuple[dict[str, torch.Tensor], float] | None = None) -> tuple[list[dict], dict]:
    """Train one arm with `cfg`'s recipe, call `evaluate(trained_model)` inside the arm, restore the model.
    `first`: the shared first-step gradients (`first_gradients`), used by every arm but LoRA.

    Returns (loss curve, {trainable, trainable_fraction, **evaluate's dict})."""
    total = param_count(model)
    with arm(model, name, cfg, masks, invert, seed, snapshot) as (m, opt):
        n = trainable_count(opt)
        curve = train(m, opt, examples, cfg.max_steps, cfg.batch_size, pad_id, cfg.grad_accum,
                      cfg.warmup_ratio, cfg.schedule, cfg.max_grad_norm, seed, desc=f"train {name}",
                      first=None if name == "lora" else first)
        result = {"trainable": n, "trainable_fraction": n / total, **evaluate(m)}
        del opt
    gc.collect()   # free this arm's moments before the next arm allocates its own (0.5B: 5 GB each)
    return curve, result


# ---------------------------------------------------------------- SET and SPA


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
    responses, finished = chat.generate(model, tok, prompts, max_new_tokens, batch_size, system, desc=desc,
                                        with_finished=True)
    complied = judge.judge(prompts, responses).complied
    return [{"dataset": n, "prompt": p, "response": r, "complied": bool(c), "finished": f}
            for n, p, r, c, f in zip(names, prompts, responses, complied, finished)]


def _rate(rows: list[dict], sets) -> float:
    picked = [r["complied"] for r in rows if r["dataset"] in sets]
    return sum(picked) / len(picked) if picked else float("nan")


UTILITY = "_utility"   # set name of the utility prompts inside one generation batch


def set_measure(model, tok, harmful: dict[str, list[str]], benign: dict[str, list[str]], utility_prompts,
                utility_answers, judge, cfg, desc: str, rows: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """SET evaluation: ASR (pooled over the harmful sets), benign refusal rate, utility, per-set rates.
    `rows` = generations already made for these sets (the untuned model's), else generated here."""
    from .validate import utility_score
    if rows is None:
        rows = generate_sets(model, tok, {**harmful, **benign}, judge, cfg.max_new_tokens, cfg.eval_batch_size,
                             cfg.system_prompt, desc)
    out = {"asr": _rate(rows, harmful), "benign_refusal": 1 - _rate(rows, benign),
           "utility": utility_score(model, tok, utility_prompts, utility_answers, cfg.eval_batch_size,
                                    cfg.system_prompt),
           "per_set_refusal": {s: 1 - _rate(rows, [s]) for s in {**harmful, **benign}}}
    return out, rows


def run_set(model, tok, cfg, masks: dict[str, dict[str, torch.Tensor]], pairs: list[dict],
            harmful: dict[str, list[str]], benign: dict[str, list[str]], utility_prompts: list[str], judge,
            seed: int = 0):
    """Every SET arm on the same data and steps. `masks` = {arm: region masks} for the masked arms.

    The utility score is exp(mean log-likelihood) of the untuned model's greedy answers to `utility_prompts`
    (validate.utility_score): 1/perplexity of what the model said before, so it falls when tuning breaks it.
    Returns (metrics {arm: {...}}, curves [{arm, step, loss, lr}], generations)."""
    examples = encode(tok, [r["prompt"] for r in pairs], [r["response"] for r in pairs], cfg.max_length,
                      cfg.chat_template, cfg.loss_on_prompt, cfg.system_prompt)
    rows = generate_sets(model, tok, {**harmful, **benign, UTILITY: utility_prompts}, judge, cfg.max_new_tokens,
                         cfg.eval_batch_size, cfg.system_prompt, "before")
    answers = [r["response"] for r in rows if r["dataset"] == UTILITY]
    rows = [r for r in rows if r["dataset"] != UTILITY]
    before, _ = set_measure(model, tok, harmful, benign, utility_prompts, answers, judge, cfg, "before", rows)
    gens = [{"arm": "before", **r} for r in rows]
    metrics, curves, snapshot = {}, [], Snapshot(model)
    first = first_gradients(model, examples, cfg.batch_size, tok.pad_token_id, cfg.grad_accum, seed) \
        if any(a != "lora" for a in cfg.arms) else None
    for name in cfg.arms:
        def evaluate(m, name=name):
            after, rows = set_measure(m, tok, harmful, benign, utility_prompts, answers, judge, cfg, name)
            gens.extend({"arm": name, **r} for r in rows)
            return after
        curve, res = run_arm(model, name, cfg, examples, tok.pad_token_id, evaluate, masks.get(name),
                             invert=False, seed=seed, snapshot=snapshot, first=first)
        curves += [{"arm": name, **c} for c in curve]
        metrics[name] = {"asr_before": before["asr"], "asr_after": res["asr"],
                         "benign_refusal_before": before["benign_refusal"],
                         "benign_refusal_after": res["benign_refusal"],
                         "utility_before": before["utility"], "utility_after": res["utility"],
                         "trainable_fraction": res["trainable_fraction"], "trainable": res["trainable"],
                         "final_loss": curve[-1]["loss"], "per_set_refusal_after": res["per_set_refusal"]}
    return metrics, curves, gens


def spa_measure(model, tok, harmful: dict[str, list[str]], task: str, prompts, answers, targets, judge, cfg,
                desc: str) -> tuple[dict, list[dict]]:
    """SPA evaluation: ASR on the harmful sets, task score on held-out rows, and the task likelihood
    (exp mean log-likelihood of the reference targets: smooth where a few CPU steps leave the score flat)."""
    from .validate import utility_score
    rows = generate_sets(model, tok, harmful, judge, cfg.max_new_tokens, cfg.eval_batch_size, cfg.system_prompt,
                         f"{desc} safety")
    responses = chat.generate(model, tok, prompts, cfg.task_max_new_tokens[task], cfg.eval_batch_size,
                              cfg.system_prompt, desc=f"{desc} {task}")
    rows += [{"dataset": task, "prompt": p, "response": r, "answer": a}
             for p, r, a in zip(prompts, responses, answers)]
    out = {"asr": _rate(rows, harmful), "task_score": task_score(task, responses, answers),
           "task_likelihood": utility_score(model, tok, prompts, targets, cfg.eval_batch_size, cfg.system_prompt)}
    return out, rows


def run_spa(model, tok, cfg, masks: dict[str, dict[str, torch.Tensor]], utility: list[dict],
            harmful: dict[str, list[str]], judge, seed: int = 0):
    """Every SPA (task, arm): tune on the task's train rows, score its eval rows and the harmful sets.

    `masks` = {arm: region masks to FREEZE} for the masked arms (inverted here: train the rest).
    Returns (metrics {task: {arm: {...}}}, curves [{task, arm, step, loss, lr}], generations)."""
    metrics, curves, gens = {}, [], []
    asr_before, snapshot = None, Snapshot(model)
    for task in cfg.tasks:
        train_rows = [r for r in utility if r["dataset"] == task and r["split"] == "train"]
        eval_rows = [r for r in utility if r["dataset"] == task and r["split"] == "eval"][:cfg.n_task]
        if not train_rows or not eval_rows:
            raise ValueError(f"no {task} train/eval rows in the utility table")
        p_train, t_train, _ = task_pairs(train_rows, task, cfg.answer_only)
        prompts, targets, answers = task_pairs(eval_rows, task, cfg.answer_only)
        examples = encode(tok, p_train, t_train, cfg.max_length, cfg.chat_template, cfg.loss_on_prompt,
                          cfg.system_prompt)
        before, rows = spa_measure(model, tok, harmful if asr_before is None else {}, task, prompts, answers,
                                   targets, judge, cfg, "before")
        if asr_before is None:
            asr_before = before["asr"]
        gens += [{"task": task, "arm": "before", **r} for r in rows]
        metrics[task] = {}
        first = first_gradients(model, examples, cfg.batch_size, tok.pad_token_id, cfg.grad_accum, seed)
        for name in cfg.arms:
            def evaluate(m, name=name, task=task):
                after, rows = spa_measure(m, tok, harmful, task, prompts, answers, targets, judge, cfg,
                                          f"{task} {name}")
                gens.extend({"task": task, "arm": name, **r} for r in rows)
                return after
            curve, res = run_arm(model, name, cfg, examples, tok.pad_token_id, evaluate, masks.get(name),
                                 invert=True, seed=seed, snapshot=snapshot, first=first)
            curves += [{"task": task, "arm": name, **c} for c in curve]
            metrics[task][name] = {"task_score": res["task_score"], "task_score_before": before["task_score"],
                                   "task_likelihood": res["task_likelihood"],
                                   "task_likelihood_before": before["task_likelihood"],
                                   "asr_before": asr_before, "asr_after": res["asr"],
                                   "trainable_fraction": res["trainable_fraction"], "trainable": res["trainable"],
                                   "final_loss": curve[-1]["loss"]}
    return metrics, curves, gens
