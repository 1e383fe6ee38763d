"""The degenerate rule checked against outputs labelled by construction (docs/methods.md §5.6).

Coherent answers written by people and other models (and other-language answers) are cut to the token lengths the
stages generate; from the same cuts come word salad (their tokens shuffled) and loops (a short unit repeated); and
empty or whitespace-only outputs. A label is known from how the text was made, so the rule's false-positive rate
(coherent text called degenerate) and false-negative rate (salad, loops, empty text passed as coherent) are counted
with no judge in between, each with n and a Wilson 95% interval, on the model whose fluency the rule uses."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from . import chat, evaluation, evidence

LENGTHS = (6, 8, 12, 16)
"""Generated tokens per response in the stages (SPA 6, validate and ESI 8, SET 12, baseline 16)."""
COHERENT_MAX_TOKENS = 96
"""Whole answers up to this many tokens form the coherent class (longer ones only give cuts)."""
PER_LENGTH = 12
"""Source answers cut at each length, per class built from cuts (truncation, salad, loop)."""
OTHER_LANGUAGES = ("Chinese", "Russian", "Japanese", "Korean")
"""Languages the aligned model is asked to answer in: scripts a character check can confirm."""
_SCRIPTS = ((0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7AF), (0x0400, 0x04FF), (0x0600, 0x06FF),
            (0x0900, 0x097F), (0x0E00, 0x0E7F), (0x0370, 0x03FF))


class Kind(str, enum.Enum):
    """How a labelled output was made; `degenerate` is its label."""
    COHERENT = "coherent"
    OTHER_LANGUAGE = "other_language"
    TRUNCATION = "truncation"
    SALAD = "salad"
    LOOP = "loop"
    EMPTY = "empty"

    @property
    def degenerate(self) -> bool:
        return self in (Kind.SALAD, Kind.LOOP, Kind.EMPTY)


@dataclass(frozen=True)
class Labelled:
    prompt: str
    text: str
    kind: Kind
    tokens: int | None   # the length it was cut at; None for whole answers and empty text


def non_latin_share(text: str) -> float:
    """Share of the letters written in a non-Latin script (CJK, kana, Hangul, Cyrillic, Arabic, ...)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(any(lo <= ord(c) <= hi for lo, hi in _SCRIPTS) for c in letters) / len(letters)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def _salad(ids: list[int], rng: np.random.Generator) -> list[int]:
    """The tokens in a random order other than their own."""
    for _ in range(20):
        perm = rng.permutation(len(ids))
        if (perm != np.arange(len(ids))).any() and [ids[i] for i in perm] != ids:
            return [ids[i] for i in perm]
    return ids[::-1]


def _loop(ids: list[int], length: int, rng: np.random.Generator) -> list[int]:
    """A unit of 1 to length // 3 tokens from the answer, repeated until `length` tokens (>= 3 repeats); from 12
    tokens on, half the time after a coherent start of up to a third of the length."""
    start = int(rng.integers(0, length // 3 + 1)) if length >= 12 and rng.random() < 0.5 else 0
    room = length - start
    size = int(rng.integers(1, room // 3 + 1))
    at = int(rng.integers(start, max(start, len(ids) - size) + 1))
    unit = ids[at:at + size] or ids[:size]
    return (ids[:start] + unit * (room // len(unit) + 1))[:length]


def empty_texts() -> list[str]:
    """No text at all, or whitespace only, as a model that stops at once or pads with newlines emits it."""
    return ["", " ", "  ", "\n", "\n\n", "\n\n\n", "\t", " \n", "\n ", "\r\n", " \t\n", "\n\t\n", "    ", "\u3000",
            "\u00a0", "\n" * 8, " " * 16, "\t\t", "\n \n \n", " \n\n "]


def build(tok, answers: list[tuple[str, str]], other_language: list[tuple[str, str]] = (),
          lengths: tuple[int, ...] = LENGTHS, per_length: int = PER_LENGTH, n_coherent: int = 40,
          seed: int = 0) -> list[Labelled]:
    """The labelled set from (prompt, answer) pairs of coherent `answers` and `other_language` answers (used as cuts
    only: they may be generated, themselves cut at the longest length), with the tokenizer of the model whose
    outputs the rule will judge. Each cut is made in tokens and decoded, as generation emits it; at each length
    truncations, salad and loops come from different answers (seeded)."""
    rng = np.random.default_rng(seed)
    pairs = [(p, a.strip(), _ids(tok, a.strip())) for p, a in answers if a and a.strip()]
    if not pairs:
        raise ValueError("no coherent answers to build the degenerate-rule labels from")
    out: list[Labelled] = []
    whole = [x for x in pairs if len(x[2]) <= COHERENT_MAX_TOKENS]
    for i in rng.permutation(len(whole))[:n_coherent]:
        p, a, _ = whole[i]
        out.append(Labelled(p, a, Kind.COHERENT, None))
    for length in lengths:
        long_enough = [x for x in pairs if len(x[2]) >= length]
        if not long_enough:
            raise ValueError(f"no coherent answer has {length} tokens to cut")
        picks = rng.permutation(len(long_enough))
        for kind, take in zip((Kind.TRUNCATION, Kind.SALAD, Kind.LOOP), np.array_split(picks, 3)):
            for i in take[:per_length]:
                p, _, ids = long_enough[i]
                cut = ids[:length]
                made = cut if kind is Kind.TRUNCATION else _salad(cut, rng) if kind is Kind.SALAD else \
                    _loop(ids, length, rng)
                out.append(Labelled(p, _decode(tok, made), kind, length))
        for p, a in other_language:
            ids = _ids(tok, a.strip())
            if len(ids) >= length:
                out.append(Labelled(p, _decode(tok, ids[:length]), Kind.OTHER_LANGUAGE, length))
    prompts = [x[0] for x in pairs]
    out += [Labelled(prompts[int(rng.integers(len(prompts)))], t, Kind.EMPTY, None) for t in empty_texts()]
    return out


def other_language_answers(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 8,
                           languages: tuple[str, ...] = OTHER_LANGUAGES) -> list[tuple[str, str]]:
    """The aligned model's own greedy answers when told to answer in another language; only answers whose letters
    are mostly in a non-Latin script are kept, so the language is confirmed, not assumed."""
    out = []
    for i, lang in enumerate(languages):
        chunk = prompts[i::len(languages)]
        said = chat.generate(model, tok, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             system=f"You are a helpful assistant. Always answer in {lang}.", desc=lang)
        out += [(p, a) for p, a in zip(chunk, said) if non_latin_share(a) > 0.5]
    return out


def flags(labelled: list[Labelled], logliks=None, floor: float | None = None) -> np.ndarray:
    """The rule's verdict per labelled output (`evaluation.is_degenerate`, with the fluency check where given)."""
    lls = [None] * len(labelled) if logliks is None else list(logliks)
    return np.array([evaluation.is_degenerate(x.text, ll, floor) for x, ll in zip(labelled, lls)], bool)


def rates(labelled: list[Labelled], flagged) -> dict:
    """n, false-positive rate (coherent classes called degenerate) and false-negative rate (degenerate classes
    passed), each with its Wilson 95% interval, overall and per construction class."""
    flagged = np.asarray(flagged, bool)
    kinds = np.array([x.kind.value for x in labelled])
    truth = np.array([x.kind.degenerate for x in labelled], bool)

    def est(mask, errors) -> dict:
        e = evidence.proportion(errors[mask])
        return {"n": e.n, "rate": e.effect, "ci": list(e.ci)}

    fp, fn = est(~truth, flagged), est(truth, ~flagged)
    rec = {"n": len(labelled), "false_positive_rate": fp["rate"], "false_positive_rate_ci": fp["ci"],
           "n_not_degenerate": fp["n"], "false_negative_rate": fn["rate"], "false_negative_rate_ci": fn["ci"],
           "n_degenerate": fn["n"], "by_class": {}}
    for kind in Kind:
        mask = kinds == kind.value
        if mask.any():
            wrong = flagged != truth
            e = est(mask, wrong)
            rec["by_class"][kind.value] = {"n": e["n"], "error_rate": e["rate"], "error_rate_ci": e["ci"],
                                           "labelled_degenerate": kind.degenerate}
    return rec


def halves(answers: list[tuple[str, str]], seed: int = 0) -> tuple[list, list]:
    """A seeded split of the answers: one half calibrates the fluency floor, the other is cut into labels."""
    order = np.random.default_rng(seed).permutation(len(answers))
    half = len(order) // 2
    return [answers[i] for i in order[:half]], [answers[i] for i in order[half:]]


def reference_fluency(model, tok, answers: list[tuple[str, str]], lengths: tuple[int, ...] = LENGTHS,
                      n: int = 32, batch_size: int = 8, system: str | None = None, seed: int = 0,
                      quantile: float = evaluation.LOGLIK_QUANTILE) -> evaluation.Fluency:
    """The fluency check, its floor halfway between the `quantile` of the mean log-likelihood under `model` of
    coherent answers it did not write, cut at the generated lengths, and the 1 − `quantile` one of the same cuts
    shuffled. Answers by others, not the model's own greedy answers (far likelier), so that fluent text an edited
    model writes passes; halfway, because short cuts of coherent text spread widely (6 tokens of a refusal can
    score −4.8 on the 0.5B, while salad stays below −6.8)."""
    rng = np.random.default_rng(seed)
    prompts, cuts, salads = [], [], []
    for length in lengths:
        long_enough = [(p, _ids(tok, a.strip())) for p, a in answers if len(_ids(tok, a.strip())) >= length]
        for i in rng.permutation(len(long_enough))[:n]:
            prompts.append(long_enough[i][0])
            cuts.append(_decode(tok, long_enough[i][1][:length]))
            salads.append(_decode(tok, _salad(long_enough[i][1][:length], rng)))
    if not cuts:
        raise ValueError("no reference answer is long enough to calibrate the fluency floor")
    fluency = evaluation.Fluency(model, tok, float("nan"), batch_size)
    coherent = evaluation.calibrate_floor(fluency.logliks(prompts, cuts, system), quantile)
    salad = -evaluation.calibrate_floor(-fluency.logliks(prompts, salads, system), quantile)
    fluency.floor = (coherent + salad) / 2
    return fluency


def rule_metrics(model, tok, answers: list[tuple[str, str]], other_language: list[tuple[str, str]] = (),
                 lengths: tuple[int, ...] = LENGTHS, per_length: int = PER_LENGTH, n_coherent: int = 40,
                 n_calibration: int = 32, batch_size: int = 8, system: str | None = None, seed: int = 0) -> dict:
    """`degenerate_rule` of results/validate/metrics.json: the rule's error rates on the labelled set (`rates`)
    with the fluency check of the intact `model` (floor from one half of `answers`, labels from the other), its
    floor, and the rates of the text rules alone."""
    calibration, held_out = halves(answers, seed)
    fluency = reference_fluency(model, tok, calibration, lengths, n_calibration, batch_size, system, seed)
    labelled = build(tok, held_out, other_language, lengths, per_length, n_coherent, seed)
    lls = fluency.logliks([x.prompt for x in labelled], [x.text for x in labelled], system)
    return {**rates(labelled, flags(labelled, lls, fluency.floor)), "fluency_floor": fluency.floor,
            "text_rules_only": rates(labelled, flags(labelled))}
