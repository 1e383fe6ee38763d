import json
from pathlib import Path

import pytest
import torch

from saferegions import chat, evaluation, generation_cache, judges, tiny
from saferegions.generation_cache import use

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis to a child.",
           "What is 12 plus 30?", "Tell me a story about a robot.", "Is the movie good?"]


@pytest.fixture
def counted():
    """A tiny model whose generate() calls are counted (calls[0])."""
    model, tok = tiny.tiny_model("qwen2")
    calls = [0]
    inner = model.generate

    def generate(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)
    model.generate = generate
    return model, tok, calls


def stored(path: Path) -> dict:
    """{key: entry} over every condition file of the store."""
    rows = {}
    for f in sorted(path.glob("*.json")):
        rows.update(json.loads(f.read_text())["rows"])
    return rows


def test_a_second_evaluation_of_the_same_condition_generates_nothing(counted, tmp_path):
    model, tok, calls = counted
    judge = judges.KeywordJudge()
    with use(tmp_path):
        first = evaluation.evaluate(model, tok, PROMPTS, judge, max_new_tokens=6, batch_size=4)
        assert calls[0] == 2                                      # two batches of at most 4
        second = evaluation.evaluate(model, tok, PROMPTS, judge, max_new_tokens=6, batch_size=4)
    assert calls[0] == 2
    assert second.responses == first.responses and second.outcomes == first.outcomes
    with use(None):                                               # and the stored answers are the model's
        assert chat.generate(model, tok, PROMPTS, 6, 4) == first.responses
    assert {e["text"] for e in stored(tmp_path).values()} == set(first.responses)   # text kept for re-judging


def test_one_changed_weight_misses_and_the_restored_model_hits(counted, tmp_path):
    model, tok, calls = counted
    weight = model.model.layers[1].mlp.down_proj.weight
    with use(tmp_path):
        chat.generate(model, tok, PROMPTS, 6, 8)
        original = weight[3, 7].item()
        with torch.no_grad():
            weight[3, 7] = 0.0                                   # a mask of one weight
        chat.generate(model, tok, PROMPTS, 6, 8)
        assert calls[0] == 2
        with torch.no_grad():
            weight[3, 7] = original
        chat.generate(model, tok, PROMPTS, 6, 8)
    assert calls[0] == 2
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_shorter_greedy_request_is_cut_from_a_longer_entry(counted, tmp_path):
    model, tok, calls = counted
    long_dir, short_dir = tmp_path / "long", tmp_path / "short"
    with use(long_dir):
        chat.generate(model, tok, PROMPTS, 12, 8)
        served = chat.generate(model, tok, PROMPTS, 5, 8, with_finished=True)
    assert calls[0] == 1
    with use(short_dir):
        fresh = chat.generate(model, tok, PROMPTS, 5, 8, with_finished=True)
    assert served == fresh
    long, short = stored(long_dir), stored(short_dir)
    assert long.keys() == short.keys()
    for key, entry in short.items():
        assert entry["tokens"] == long[key]["tokens"][:len(entry["tokens"])]
        assert len(entry["tokens"]) == 5 or entry["stopped"]
    with use(short_dir):                                          # a longer request replaces the shorter entries
        assert chat.generate(model, tok, PROMPTS, 12, 8) == chat.generate(model, tok, PROMPTS, 12, 8)
    assert stored(short_dir) == long


def test_a_stopped_entry_serves_any_longer_request(tmp_path):
    model, tok = tiny.tiny_model("qwen2")
    with torch.no_grad():                                         # every logit 0: greedy says token 0 ...
        model.model.norm.weight.zero_()
    model.generation_config.eos_token_id = [tok.eos_token_id, 0]  # ... which ends the turn
    with use(tmp_path):
        assert chat.generate(model, tok, PROMPTS, 4, 8, with_finished=True)[1] == [True] * len(PROMPTS)
        assert all(e["stopped"] and len(e["tokens"]) == 1 for e in stored(tmp_path).values())
        model.generate = None                                     # would fail if called
        assert chat.generate(model, tok, PROMPTS, 50, 8, with_finished=True)[1] == [True] * len(PROMPTS)


def test_another_system_prompt_misses(counted, tmp_path):
    model, tok, calls = counted
    with use(tmp_path):
        chat.generate(model, tok, PROMPTS, 6, 8, system="You are a helpful assistant.")
        chat.generate(model, tok, PROMPTS, 6, 8, system="You are a pirate.")
        chat.generate(model, tok, PROMPTS, 6, 8)
    assert calls[0] == 3


def test_sampling_hits_only_the_same_seed_and_settings(counted, tmp_path):
    model, tok, calls = counted
    sample = dict(do_sample=True, temperature=1.0, top_p=0.9)
    with use(tmp_path):
        a = chat.generate(model, tok, PROMPTS, 6, 4, seed=1, **sample)
        assert calls[0] == 2
        assert chat.generate(model, tok, PROMPTS, 6, 4, seed=1, **sample) == a
        assert calls[0] == 2
        chat.generate(model, tok, PROMPTS, 6, 4, seed=2, **sample)
        assert calls[0] == 4
        chat.generate(model, tok, PROMPTS, 6, 4, seed=1, do_sample=True, temperature=0.7, top_p=0.9)
        assert calls[0] == 6
        chat.generate(model, tok, PROMPTS, 6, 3, seed=1, **sample)     # other batches draw other numbers
        assert calls[0] == 8
    with use(None):
        assert chat.generate(model, tok, PROMPTS, 6, 4, seed=1, **sample) == a


def test_a_hooked_model_is_cached_only_under_a_named_edit(counted, tmp_path):
    model, tok, calls = counted
    handle = model.model.layers[0].register_forward_hook(lambda m, i, o: None)
    try:
        with use(tmp_path):
            chat.generate(model, tok, PROMPTS, 6, 8)
            chat.generate(model, tok, PROMPTS, 6, 8)
            assert calls[0] == 2 and not list(tmp_path.iterdir())
            with generation_cache.edit("identity hook"):
                chat.generate(model, tok, PROMPTS, 6, 8)
                chat.generate(model, tok, PROMPTS, 6, 8)
            assert calls[0] == 3
    finally:
        handle.remove()


def test_no_store_unless_one_is_named(counted, tmp_path, monkeypatch):
    model, tok, calls = counted
    monkeypatch.delenv(generation_cache.ENV, raising=False)
    chat.generate(model, tok, PROMPTS, 6, 8)
    chat.generate(model, tok, PROMPTS, 6, 8)
    assert calls[0] == 2
    monkeypatch.setenv(generation_cache.ENV, str(tmp_path))      # the stage runner's way
    chat.generate(model, tok, PROMPTS, 6, 8)
    chat.generate(model, tok, PROMPTS, 6, 8)
    assert calls[0] == 3 and len(stored(tmp_path)) == len(PROMPTS)


def test_an_interrupted_stage_keeps_finished_batches_and_no_half_written_file(counted, tmp_path, monkeypatch):
    model, tok, calls = counted
    inner = model.generate

    def fails_second(*args, **kwargs):
        if calls[0] == 1:
            raise KeyboardInterrupt
        return inner(*args, **kwargs)
    model.generate = fails_second
    with use(tmp_path), pytest.raises(KeyboardInterrupt):
        chat.generate(model, tok, PROMPTS, 6, 4)
    assert len(stored(tmp_path)) == 4                             # the first batch, whole
    model.generate = inner
    before = {f: f.read_bytes() for f in tmp_path.iterdir()}

    def half_then_interrupt(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:len(text) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with use(tmp_path), pytest.raises(KeyboardInterrupt):
        chat.generate(model, tok, PROMPTS, 6, 4)
    monkeypatch.undo()
    assert {f: f.read_bytes() for f in tmp_path.iterdir()} == before   # no temporary left, the file unchanged
    with use(tmp_path):
        chat.generate(model, tok, PROMPTS, 6, 4)
    assert calls[0] == 3 and len(stored(tmp_path)) == len(PROMPTS)   # only the missing batch was generated


def test_every_generating_stage_declares_its_store_as_a_persistent_out():
    import yaml

    from saferegions import stage
    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    for name in stage.GENERATING:
        path = str(stage.generations_dir(name, {k: "${item.%s}" % k for k in stage.MATRIX.get(name, ())}))
        declared = [o for o in stages[name]["outs"] if isinstance(o, dict) and path in o]
        assert declared and declared[0][path] == {"persist": True}, name


def test_hook_edits_are_cached_under_their_own_names(counted, tmp_path):
    """The refusal-direction ablation and neuron deactivation edit with hooks: each is cached under a name of
    exactly what it removes, so the same edit hits and another one misses."""
    from saferegions.methods import neuron, refusal_direction
    model, tok, calls = counted
    hidden = model.config.hidden_size
    a, b = torch.zeros(hidden), torch.zeros(hidden)
    a[0], b[1] = 1.0, 1.0
    with use(tmp_path):
        edits = [lambda: refusal_direction.ablated(model, a), lambda: refusal_direction.ablated(model, 2 * a),
                 lambda: refusal_direction.ablated(model, b),
                 lambda: neuron.deactivate(model, {0: {"ffn": [1, 2]}}),
                 lambda: neuron.deactivate(model, {0: {"ffn": [1, 2]}}),
                 lambda: neuron.deactivate(model, {0: {"ffn": [3]}})]
        for edit in edits:
            with edit():
                chat.generate(model, tok, PROMPTS, 6, 8)
    assert calls[0] == 4      # the direction's norm and a repeated neuron set change nothing


def test_a_read_only_upstream_store_answers_and_stays_unchanged(counted, tmp_path, monkeypatch):
    model, tok, calls = counted
    upstream, own = tmp_path / "baseline", tmp_path / "validate"
    with use(upstream):
        longer = chat.generate(model, tok, PROMPTS, 12, 8)
    before = {f.name: f.read_bytes() for f in upstream.iterdir()}
    monkeypatch.setenv(generation_cache.READ_ENV, str(upstream))
    with use(own):
        served = chat.generate(model, tok, PROMPTS, 6, 8)
        chat.generate(model, tok, PROMPTS[:2], 6, 8, system="You are a pirate.")
    assert calls[0] == 2                                          # only the other system prompt generated
    with use(None):
        assert served == chat.generate(model, tok, PROMPTS, 6, 8) != longer
    assert {f.name: f.read_bytes() for f in upstream.iterdir()} == before
