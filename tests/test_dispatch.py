"""A model dispatched by accelerate over the CPU and disk offload computes what the same model undispatched does:
logits, SNIP and Wanda scores and the regions selected from them. Inputs go to the input embedding's execution
device (`models.input_device`), and the row-split CPU linear is never installed on a dispatched model (it would
bypass the hooks that bring an offloaded weight in)."""
import copy

import pytest
import torch
from accelerate import dispatch_model

from saferegions import chat, cpu_linear, models, regions, tiny
from saferegions.methods.snip import snip_scores
from saferegions.methods.wanda import wanda_scores

# Embedding and lm_head on disk (the largest matrices of a real model), decoder blocks resident.
DEVICE_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "cpu",
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = tiny.tiny_tokenizer()
    model, _ = tiny.tiny_model("llama", tok)
    dispatched = dispatch_model(copy.deepcopy(model), DEVICE_MAP, main_device="cpu",
                                offload_dir=str(tmp_path_factory.mktemp("offload")))
    assert dispatched.lm_head.weight.device.type == "meta"            # really offloaded
    batches = list(chat.response_batches(tok, ["How do I bake bread?", "Write a poem about the sea."],
                                         ["Sure, here is a simple recipe.", "The sea is wide and blue."], 2, 64))
    return model, dispatched, batches


def test_same_logits_scores_and_masks(pair, monkeypatch):
    model, dispatched, batches = pair
    assert models.input_device(dispatched) == torch.device("cpu")
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT", 0)          # would route every tiny linear through row_split
    assert not cpu_linear.applies_to(dispatched) and cpu_linear.applies_to(model)
    cpu_linear.use_row_split(dispatched)
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = dispatched(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for score in (snip_scores, wanda_scores):
        s_want, s_got = score(model, batches, progress=False), score(dispatched, batches, progress=False)
        assert s_got.keys() == s_want.keys()
        for name in s_want:
            torch.testing.assert_close(s_got[name], s_want[name], rtol=1e-4, atol=1e-7)
        r_want, r_got = regions.top_fraction(s_want, 0.05), regions.top_fraction(s_got, 0.05)
        assert regions.difference(r_want, r_got).size <= 0.01 * r_want.size   # only near-ties may swap


def test_offloaded_scored_weights_are_one_clear_error(tmp_path):
    tok = tiny.tiny_tokenizer()
    model, _ = tiny.tiny_model("llama", tok)
    dispatched = dispatch_model(model, {**DEVICE_MAP, "model.layers.1": "disk"}, main_device="cpu",
                                offload_dir=str(tmp_path))
    batches = list(chat.response_batches(tok, ["Hi"], ["Hello."], 1, 32))
    for score in (snip_scores, wanda_scores):
        with pytest.raises(ValueError, match="scored weights are offloaded"):
            score(dispatched, batches, progress=False)
