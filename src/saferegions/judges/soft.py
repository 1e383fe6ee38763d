"""The differentiable judges ESI uses (docs/methods.md §4.2): each takes soft response embeddings and returns a
"safe" score autograd can differentiate. Any object with `vocab_tokenizer`, `embedding_matrix` and
`safe_score(soft_embeds, prompt=None)` is one."""
from __future__ import annotations

import torch

from ..hooks import grad_only_for
from .classifier import token_id
from .llama_guard import render


class LearnedSoftJudge:
    """The offline learned judge (sentence encoder + logistic head, docs/methods.md §5.5) made differentiable in its
    input embeddings. safe = the head's refusal logit: refusal is the safe direction on harmful prompts."""

    def __init__(self, learned_judge):
        self.judge = learned_judge
        self.vocab_tokenizer = learned_judge.tokenizer
        self.embedding_matrix = learned_judge.encoder.get_input_embeddings().weight
        self.max_length = learned_judge.max_length

    def safe_score(self, soft_embeds: torch.Tensor, prompt: str | None = None) -> torch.Tensor:
        enc, E = self.judge.encoder, self.embedding_matrix
        x = soft_embeds.to(E.dtype)
        if prompt is not None:  # ablation (judge_sees_prompt): the prompt's hard tokens before the response
            ids = self.vocab_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            x = torch.cat([E[torch.tensor(ids, device=E.device)], x])
        mask = torch.ones(1, x.shape[0], dtype=torch.long, device=x.device)
        with grad_only_for(enc, []):  # frozen: autograd keeps no matmul inputs for weight gradients
            hidden = enc(inputs_embeds=x[None], attention_mask=mask).last_hidden_state
        pooled = self.judge.pool(hidden.to(torch.promote_types(hidden.dtype, torch.float32)), mask)[0]
        return pooled @ self.judge.weight.to(pooled) + self.judge.bias.to(pooled)


class GuardSoftJudge:
    """A Llama-Guard-style causal LM as judge: [template prefix, soft response, template suffix], the prompt
    rendered once by the guard tokenizer's own chat template (`llama_guard.render`) with the response alone as
    the user turn (as the reference does; with a `prompt`, the evaluation layout: prompt as user, response as
    assistant); safe = logit of the `safe_word` token at the last position (minus that of `unsafe_word` when
    given: the score §5.5 validated for the Qwen stand-in). Ids come from the tokenizer.

    The template is tokenized in two pieces around the response, so a token spanning a piece boundary (e.g.
    the space after 'User:') is split where a whole-text tokenization would merge it, as in the reference."""

    SENTINEL = "\x00RESPONSE\x00"

    def __init__(self, model, tokenizer, safe_word: str = "safe", unsafe_word: str | None = None):
        self.model, self.vocab_tokenizer = model, tokenizer
        self.embedding_matrix = model.get_input_embeddings().weight
        self.max_length = None
        self.safe_id = token_id(tokenizer, safe_word)
        self.unsafe_id = token_id(tokenizer, unsafe_word) if unsafe_word else None
        self._pieces = {}

    def template(self, prompt: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids before and after the response in the rendered guard prompt (split at a sentinel)."""
        if prompt not in self._pieces:
            before, after = render(self.vocab_tokenizer, prompt, self.SENTINEL).split(self.SENTINEL)
            tok = self.vocab_tokenizer
            self._pieces[prompt] = (tok(before, add_special_tokens=False)["input_ids"],
                                    tok(after, add_special_tokens=False)["input_ids"])
        return self._pieces[prompt]

    def safe_score(self, soft_embeds: torch.Tensor, prompt: str | None = None) -> torch.Tensor:
        E = self.embedding_matrix
        before, after = (torch.tensor(i, dtype=torch.long, device=E.device) for i in self.template(prompt))
        x = torch.cat([E[before], soft_embeds.to(E.dtype), E[after]])
        with grad_only_for(self.model, []):  # frozen: autograd keeps no matmul inputs for weight gradients
            out = self.model(inputs_embeds=x[None], logits_to_keep=1, use_cache=False)
        logits = out.logits[0, -1].float()
        return logits[self.safe_id] - (logits[self.unsafe_id] if self.unsafe_id is not None else 0.0)
