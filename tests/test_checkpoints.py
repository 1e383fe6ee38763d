"""Resume of the long non-training stages: identify (a unit per dataset) and ESI's gradient sums. A run killed after
k units (or prompts) and re-run ends with files byte-identical to an uninterrupted run and recomputes only what was
left; a checkpoint of another run is ignored; the value codec round-trips what the runners store."""
import pytest
import torch

from saferegions import checkpoints, regions
from saferegions.checkpoints import Checkpoints
from saferegions.evaluation import utility_score
from saferegions.stages import identify
from saferegions.tiny import tiny_model

from test_esi import judge  # noqa: F401  (a fixture)
from test_esi_stage import PROMPTS as ESI_SETS, _cfg, _peaked, learned  # noqa: F401  (learned: a fixture)
from test_identify import _ctx_with, setup  # noqa: F401  (a fixture)


class Killed(Exception):
    pass


class Counting(Checkpoints):
    """Checkpoints that count the units computed and read, and raise Killed once `kill_after` units are saved
    (counted over every store sharing the list `saves`)."""

    def __init__(self, root, key, kill_after=None, saves=None):
        super().__init__(root, key)
        self.kill_after, self.saved, self.read = kill_after, [], []
        self.saves = self.saved if saves is None else saves

    def save(self, name, value):
        super().save(name, value)
        self.saved.append(name)
        if self.saves is not self.saved:
            self.saves.append(name)
        if self.kill_after is not None and len(self.saves) >= self.kill_after:
            raise Killed(name)

    def load(self, name):
        value = super().load(name)
        if value is not None:
            self.read.append(name)
        return value


def test_codec_round_trips_the_runners_values(tmp_path):
    region = regions.Region({"w": torch.tensor([[True, False], [False, True]])}, {"kind": "raw", "n": 2},
                            {"layers": [1, 3]})
    value = {"region": region, "scores": {"a.weight": torch.arange(6.0).reshape(2, 3)},
             "curve": {1: 0.5, 2: 0.25}, "pair": (0.1, [{"q": 0.01, "p": 0.04}]), "units": {0: {"ffn": [1, 2]}},
             "none": None, "nan": float("nan")}
    store = Checkpoints(tmp_path, {"run": 1})
    store.save("u.raw", value)
    back = store.load("u.raw")
    assert back["curve"] == {1: 0.5, 2: 0.25} and list(back["curve"])[0] == 1     # int keys stay ints
    assert back["pair"][0] == 0.1 and isinstance(back["pair"], tuple) and back["units"] == {0: {"ffn": [1, 2]}}
    assert torch.equal(back["scores"]["a.weight"], value["scores"]["a.weight"]) and back["none"] is None
    assert back["nan"] != back["nan"]
    assert torch.equal(back["region"].masks["w"], region.masks["w"]) and back["region"].meta == region.meta
    assert back["region"].units == region.units
    assert store.load("u.refined") is None
    with pytest.raises(ValueError, match="unit names"):
        store.save("../x", 1)


def test_a_checkpoint_of_another_run_is_ignored_and_replaced(tmp_path, capsys):
    Checkpoints(tmp_path / "c", {"method": "snip", "q": 0.02}).save("advbench.raw", {"x": 1})
    assert Checkpoints(tmp_path / "c", {"method": "snip", "q": 0.02}).load("advbench.raw") == {"x": 1}
    other = Checkpoints(tmp_path / "c", {"method": "snip", "q": 0.05})
    assert "another run" in capsys.readouterr().out
    assert other.load("advbench.raw") is None
    assert Checkpoints(tmp_path / "c", {"method": "snip", "q": 0.05}).key == {"method": "snip", "q": 0.05}
    assert checkpoints.unit(None, "any", lambda: 7) == 7


def test_identify_run_key_names_the_method_params_model_and_data(setup):  # noqa: F811
    model, tok = tiny_model("llama")
    key = identify.run_key(_ctx_with(setup, model, tok), "snip", {})
    assert identify.run_key(_ctx_with(setup, *tiny_model("llama")), "snip", {}) == key
    assert identify.run_key(_ctx_with(setup, model, tok), "wanda", {}) != key
    assert identify.run_key(_ctx_with(setup, model, tok, snip={"n": 1}), "snip", {}) != key
    other = _ctx_with(setup, model, tok)
    other.calib = {**other.calib, "advbench": (["x"], ["y"], [True])}
    assert identify.run_key(other, "snip", {}) != key
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    assert identify.run_key(_ctx_with(setup, model, tok), "snip", {}) != key


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


IDENTIFY_CASES = {   # method: (identify sub-sections, units of the killed run)
    "snip": ({}, 3),               # the utility region and advbench's two halves
    "wanda": ({}, 3),              # the utility region, advbench's raw region and its p/q sweep
    "neuron": ({"neuron": {"n": 4, "min_prompt_frac": 0.5}}, 2),   # the top-up and the utility neurons
    "layer": ({}, 2),
    "nlsr": ({}, 3),               # the safety LoRA, the utility and advbench projections
}


@pytest.mark.parametrize("method", list(IDENTIFY_CASES))
def test_killed_identify_resumes_to_the_uninterrupted_result(setup, tmp_path, method):  # noqa: F811
    """An uninterrupted run, a run killed after k units, and its re-run: the re-run reads the k units, computes
    only the others, writes byte-identical region files and the same metrics, and removes its checkpoints."""
    sections, k = IDENTIFY_CASES[method]

    def ctx_for(store_kill=None, resume=False):
        model, tok = tiny_model("llama")
        ctx = _ctx_with(setup, model, tok, **sections)
        if method in ("snip", "wanda"):      # with the p/q sweep, itself a unit
            ctx.utility_eval = (["Write a poem about the sea.", "Name a fruit."], ["The sea is wide.", "An apple."])
            ctx.utility = utility_score
            ctx.split_half = ["advbench"] if method == "snip" else []
        if store_kill is not None or resume:
            ctx.checkpoints = Counting(tmp_path / "ckpt", identify.run_key(ctx, method, {}), store_kill)
        return ctx

    ref = ctx_for()
    identify.run(method, ref, tmp_path / "ref")
    killed = ctx_for(store_kill=k)
    with pytest.raises(Killed):
        identify.run(method, killed, tmp_path / "out")
    assert len(killed.checkpoints.saved) == k
    again = ctx_for(resume=True)
    rows = identify.run(method, again, tmp_path / "out")
    assert again.checkpoints.read == killed.checkpoints.saved
    assert not set(again.checkpoints.saved) & set(killed.checkpoints.saved) and again.checkpoints.saved
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert identify.metrics(rows, method, "aligned", "tiny/llama", again.details, again.metrics) == \
        identify.metrics(rows, method, "aligned", "tiny/llama", ref.details, ref.metrics)
    assert again.details == ref.details
    assert not (tmp_path / "ckpt").exists()


ESI_PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Name a fruit.", "Count to three.",
               "Explain rain."]


@pytest.mark.parametrize("variant, objective", [("faithful", "judge"), ("fixed", "judge"),
                                                ("fixed", "response_likelihood")])
def test_killed_esi_gradients_resume_to_the_uninterrupted_sums(judge, tmp_path, monkeypatch, variant,  # noqa: F811
                                                               objective):
    """Checkpoints every 2 of 5 prompts, killed at the second save (responses, then the sums after prompt 2): the
    re-run reads both, runs prompts 3-5 only, and its sums (Gumbel noise included), records and responses equal
    those of a run never interrupted, which equal those of a run without checkpoints."""
    from saferegions.methods import esi
    model, tok = tiny_model("llama")
    kw = dict(max_new_tokens=5, variant=variant, objective=objective, progress=False, every=2)
    plain_records, ckpt_records, records = [], [], []
    plain = esi.esi_gradients(model, tok, judge, ESI_PROMPTS, records=plain_records,
                              **{k: v for k, v in kw.items() if k != "every"})
    ref = esi.esi_gradients(model, tok, judge, ESI_PROMPTS, records=ckpt_records, checkpoint=tmp_path / "ref", **kw)
    assert all(torch.equal(plain[n], ref[n]) for n in plain) and plain_records == ckpt_records
    assert not (tmp_path / "ref").exists()
    stores = []

    def counting(root, key):
        stores.append(Counting(root, key, kill_after=None if len(stores) else 2))
        return stores[-1]
    monkeypatch.setattr(esi, "Checkpoints", counting)
    with pytest.raises(Killed):
        esi.esi_gradients(model, tok, judge, ESI_PROMPTS, records=[], checkpoint=tmp_path / "c", **kw)
    assert stores[0].saved == ["responses", "sums"]
    backwards = []
    model.lm_head.register_full_backward_hook(lambda *a: backwards.append(1))
    again = esi.esi_gradients(model, tok, judge, ESI_PROMPTS, records=records, checkpoint=tmp_path / "c", **kw)
    assert stores[1].read == ["responses", "sums"] and stores[1].saved == ["sums"]    # after prompt 4
    assert len(backwards) == 3 and records == ckpt_records and len(records) == (5 if objective == "judge" else 0)
    assert all(torch.equal(again[n], ref[n]) for n in ref) and not (tmp_path / "c").exists()


def test_esi_checkpoint_of_other_prompts_is_not_resumed(judge, tmp_path, capsys):  # noqa: F811
    from saferegions.methods import esi
    model, tok = tiny_model("llama")
    kw = dict(max_new_tokens=5, variant="fixed", progress=False, every=1)
    Checkpoints(tmp_path / "c", {"stale": True}).save("sums", {"done": 4})
    got = esi.esi_gradients(model, tok, judge, ESI_PROMPTS[:2], checkpoint=tmp_path / "c", **kw)
    assert "another run" in capsys.readouterr().out
    ref = esi.esi_gradients(model, tok, judge, ESI_PROMPTS[:2], **kw)
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_killed_esi_stage_resumes_its_generation_and_the_spec_it_was_in(learned, tmp_path, monkeypatch):  # noqa: F811
    """compute_regions with checkpoints, killed in its second spec (after 1 of 2 prompts): the re-run reads the
    shared responses and that spec's sums, and every spec's gradients and region equal an uninterrupted run's."""
    from saferegions.methods import esi
    from saferegions.stages import esi as esi_stage
    e = _cfg(checkpoint_every=1).esi
    model, tok = _peaked()
    specs = esi_stage.plan(e, "aligned")
    prompt_sets = {d: ESI_SETS[d][:e.n_prompts] for d in {s.dataset for s in specs}}

    def regions_of(checkpoints=None):
        return {s.name: (grads, top) for s, top, grads, _, _ in esi_stage.compute_regions(
            model, tok, specs, prompt_sets, {"learned": learned}, e, {}, {}, False, checkpoints)}
    ref = regions_of()
    stores, saves, kill = [], [], {"after": 3}

    def counting(root, key):
        stores.append(Counting(root, key, kill["after"], saves))
        return stores[-1]
    monkeypatch.setattr(esi, "Checkpoints", counting)
    with pytest.raises(Killed):
        regions_of(tmp_path / "ckpt")
    assert saves == ["responses", "sums", "sums"] and stores[-1].root.name == specs[1].name
    stores.clear()
    kill["after"] = None
    got = regions_of(tmp_path / "ckpt")
    assert stores[0].read == ["responses"] and stores[2].read == ["sums"] and stores[1].read == []
    for name, (grads, top) in ref.items():
        assert all(torch.equal(got[name][0][n], grads[n]) for n in grads)
        assert all(torch.equal(got[name][1].masks[n], top.masks[n]) for n in top.masks)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"responses"}   # `run` removes it with the role
