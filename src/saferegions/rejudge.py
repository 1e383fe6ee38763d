"""Re-judging a paired comparison's discordant pairs at a longer length (docs/methods.md, "Name the metric").

The stages judge refusal onset in the first few generated tokens. Where two arms disagree on a prompt, that
prompt decides the paired effect, so those prompts are generated again at a length where a refusal or an answer
has had room to show, and judged again. The agreement says how far the short-length outcome is the outcome a
reader would call it from the longer answer; the re-judged effect substitutes the long outcomes on the
discordant pairs (concordant pairs keep their short outcome: they are not re-generated)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from . import evidence
from .evaluation import Evaluation, evaluate


@dataclass(frozen=True)
class Comparison:
    """`a` − `b` on the same prompts: arm names (keys of the arms' evaluations and weight edits)."""
    name: str
    a: str
    b: str


def discordant(a: Evaluation, b: Evaluation) -> np.ndarray:
    """Indices of the prompts whose outcome (coherent compliance) differs between two arms."""
    return np.flatnonzero(np.asarray(a.complied) != np.asarray(b.complied))


def rejudge(model, tok, comparisons: list[Comparison], evals: dict[str, Evaluation],
            edits: dict[str, Callable[[], AbstractContextManager]], judge, max_new_tokens: int, batch_size: int,
            system: str | None = None) -> dict[str, dict]:
    """{comparison: record} for each comparison: its discordant pairs generated again at `max_new_tokens` under
    each arm's edit (`edits[arm]()` a context manager applying it; each arm generates once, for the union of the
    prompts its comparisons need) and judged with `judge`. A record holds n_discordant, the agreement of the long
    with the short outcome over the 2 x n_discordant re-judged answers (Wilson interval; None without a discordant
    pair), the short effect and the
    effect with the long outcomes substituted (both paired over all n prompts)."""
    need: dict[str, set[int]] = {}
    for c in comparisons:
        idx = set(discordant(evals[c.a], evals[c.b]).tolist())
        for arm in (c.a, c.b):
            need.setdefault(arm, set()).update(idx)
    long: dict[str, dict[int, bool]] = {}
    for arm, idx in need.items():
        order = sorted(idx)
        if not order:
            long[arm] = {}
            continue
        prompts = [evals[arm].prompts[i] for i in order]
        with edits[arm]():
            ev = evaluate(model, tok, prompts, judge, max_new_tokens, batch_size, system, desc=f"re-judge {arm}")
        long[arm] = dict(zip(order, np.asarray(ev.complied).tolist()))
    out = {}
    for c in comparisons:
        idx = discordant(evals[c.a], evals[c.b])
        short_a, short_b = np.asarray(evals[c.a].complied), np.asarray(evals[c.b].complied)
        long_a, long_b = short_a.copy(), short_b.copy()
        for i in idx:
            long_a[i], long_b[i] = long[c.a][i], long[c.b][i]
        agree = np.concatenate([long_a[idx] == short_a[idx], long_b[idx] == short_b[idx]])
        out[c.name] = {"arms": [c.a, c.b], "max_new_tokens": max_new_tokens, "n_discordant": int(len(idx)),
                       "agreement": evidence.proportion(agree).as_dict() if len(idx) else None,
                       "effect_short": evidence.paired_proportions(short_a, short_b).as_dict(),
                       "effect_rejudged": evidence.paired_proportions(long_a, long_b).as_dict()}
    return out
