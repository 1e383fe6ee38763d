"""Vocabulary transfer from a judge's tokens to a target model's (docs/methods.md §4.2 step 2, §5.7): the matrix M
that carries the judge's gradient over its own tokens to the target's vocabulary, and how much of a response it
reaches."""
from __future__ import annotations

import torch


def token_text(token: str) -> str:
    """A vocabulary entry as text, the reference's way: only a leading 'Ġ' (byte-level BPE) or '▁'
    (SentencePiece) becomes a space; other byte symbols (e.g. 'Ċ') are left as they are."""
    return " " + token[1:] if token[:1] in ("Ġ", "▁") else token


def transfer_matrix(judge_tok, target_tok, shape: tuple[int, int] | None = None,
                    decode: bool = False) -> torch.Tensor:
    """Sparse fp32 M (V_g × V_t): judge id → its token text re-tokenized by the target into n ids, 1/n each.

    Build it once per (judge, target) pair and pass it to `esi_gradients(transfer_M=...)`. `shape` defaults
    to the tokenizers' lengths; pass the embedding/logit sizes when those are padded beyond the vocabulary.
    `decode=True` (not the reference) turns every token into its real text with the judge's own decoder, so
    byte symbols such as 'Ċ' (newline) map to the target's newline rather than to the bytes of 'Ċ'.
    A WordPiece judge (MiniLM) has no space marker, so it gets `wordpiece_pairs` instead (docs/methods.md §5.7)."""
    n_g, n_t = shape or (len(judge_tok), len(target_tok))
    if _wordpiece_prefix(judge_tok) is not None:
        return _sparse(wordpiece_pairs(judge_tok, target_tok), (n_g, n_t))
    ids = list(range(min(n_g, len(judge_tok))))
    tokens = judge_tok.convert_ids_to_tokens(ids)
    present = [(i, judge_tok.convert_tokens_to_string([t]) if decode else token_text(t))
               for i, t in zip(ids, tokens, strict=True) if t]
    present = [(i, t) for i, t in present if t]
    texts = [t for _, t in present]
    encoded = target_tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    rows, cols, vals = [], [], []
    for (i, _), target_ids in zip(present, encoded, strict=True):
        target_ids = [t for t in target_ids if t < n_t]
        rows += [i] * len(target_ids)
        cols += target_ids
        vals += [1.0 / len(target_ids)] * len(target_ids)
    index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    values = torch.tensor(vals, dtype=torch.float32)
    return torch.sparse_coo_tensor(index, values, (n_g, n_t), check_invariants=True).coalesce()


def _wordpiece_prefix(tok) -> str | None:
    """The continuing-subword prefix ('##') of a WordPiece (BERT-style) fast tokenizer, else None."""
    from tokenizers.models import WordPiece
    model = getattr(getattr(tok, "backend_tokenizer", None), "model", None)
    return model.continuing_subword_prefix if isinstance(model, WordPiece) else None


def _lowercases(tok) -> bool:
    """True for an uncased tokenizer (its normalizer lower-cases), whose vocabulary has no capitals."""
    norm = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    return norm.normalize_str("A") == "a" if norm is not None else bool(getattr(tok, "do_lower_case", False))


def _sparse(pairs: dict[tuple[int, int], float], shape: tuple[int, int]) -> torch.Tensor:
    pairs = {k: v for k, v in pairs.items() if k[0] < shape[0] and k[1] < shape[1]}
    index = torch.tensor(list(pairs), dtype=torch.long).reshape(-1, 2).T
    values = torch.tensor(list(pairs.values()), dtype=torch.float32)
    return torch.sparse_coo_tensor(index, values, shape, check_invariants=True).coalesce()


def _encode(tok, texts: list[str]) -> list[list[int]]:
    """Ids of many texts without special tokens; the Rust batch encoder directly when there is one (half the
    time of `tok(texts)` on a 150k-entry vocabulary)."""
    if not texts:
        return []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return tok(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def wordpiece_pairs(judge_tok, target_tok) -> dict[tuple[int, int], float]:
    """{(judge id, target id): weight} for a WordPiece judge (docs/methods.md §5.7).

    WordPiece marks continuations ('##ing') instead of word starts and an uncased one has no capitals, so the
    reference's 'Ġ' rule reaches no space-prefixed target token. Here a word-initial judge token maps to the
    target's space-prefixed and bare forms, a '##' piece to its bare form, for an uncased judge each also
    Capitalized and UPPER (" sorry", "sorry", " Sorry", ...): weight 1 to every form that is one target token;
    a token with no such form gets the reference's split of its first form (1/n over its n target tokens).
    A target token still unreached (Qwen's "'m", which BERT splits into "'" and "m") takes the judge pieces of
    its own text, 1/n each. Special tokens map to nothing."""
    prefix = _wordpiece_prefix(judge_tok)
    special = set(judge_tok.all_special_ids)
    cased = not _lowercases(judge_tok)
    forms: dict[int, list[str]] = {}
    for i, t in enumerate(judge_tok.convert_ids_to_tokens(list(range(len(judge_tok))))):
        if not t or i in special or (len(t) > 2 and t[0] == "[" and t[-1] == "]"):   # [unused12] etc.
            continue
        cont = t.startswith(prefix) and len(t) > len(prefix)
        word = t[len(prefix):] if cont else t
        variants = [word] if cased else [word, word.capitalize(), word.upper()]
        forms[i] = list(dict.fromkeys(f for v in variants for f in ([v] if cont else [" " + v, v])))
    flat = [f for fs in forms.values() for f in fs]
    encoded = iter(_encode(target_tok, flat))
    pairs: dict[tuple[int, int], float] = {}
    for i, fs in forms.items():
        ids = [next(encoded) for _ in fs]
        singles = {x[0] for x in ids if len(x) == 1}
        for j in singles or ids[0]:
            pairs[i, j] = 1.0 if singles else max(pairs.get((i, j), 0.0), 1.0 / len(ids[0]))
    reached = {j for _, j in pairs}
    t_special = set(target_tok.all_special_ids) | {
        j for j, a in getattr(target_tok, "added_tokens_decoder", {}).items() if a.special}
    rest = [j for j in range(len(target_tok)) if j not in reached and j not in t_special]
    texts = [target_tok.convert_tokens_to_string([t]) for t in target_tok.convert_ids_to_tokens(rest)]
    for j, ids in zip(rest, _encode(judge_tok, texts), strict=True):
        ids = [i for i in ids if i not in special]
        for i in ids:
            pairs[i, j] = max(pairs.get((i, j), 0.0), 1.0 / len(ids))
    return pairs


def judge_token_coverage(G_L: torch.Tensor, response_ids, skip_ids=()) -> float:
    """Share of the response's tokens t whose own id y_t gets a nonzero transferred judge gradient G_L[t, y_t]
    (rows beyond G_L's get none): how much of the response S can reach (docs/methods.md §5.7). Tokens in
    `skip_ids` (EOS: the judge reads the text without special tokens) are left out; NaN if none is left."""
    hits, n = coverage_counts(G_L, response_ids, skip_ids)
    return hits / n if n else float("nan")


def coverage_counts(G_L: torch.Tensor, response_ids, skip_ids=()) -> tuple[int, int]:
    """(tokens reached, tokens counted) of `judge_token_coverage`, to pool over responses."""
    skip = {int(i) for i in skip_ids}
    rows = [(t, int(y)) for t, y in enumerate(response_ids) if int(y) not in skip]
    inside = [(t, y) for t, y in rows if t < G_L.shape[0] and y < G_L.shape[1]]
    if not inside:
        return 0, len(rows)
    t, y = torch.tensor(inside, device=G_L.device).T
    return int((G_L[t, y] != 0).sum()), len(rows)
