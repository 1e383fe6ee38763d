"""ESI architecture claim (docs/methods.md §4.4): which cell each weight is booked in (llama, qwen2, a tiny MoE),
the per-prompt mass against planted gradients and a direct sum over the block matrices (lm_head, embeddings and
norms outside the denominator), ESI rather than |W|, the layer thirds, and the parts' bootstrap estimates."""
import re

import numpy as np
import pytest
import torch

from saferegions.methods import esi
from saferegions.methods import esi_architecture as A
from saferegions.tiny import tiny_model

ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$")
MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")


def _expected_dense(name):
    """The cell of a dense model's parameter, written out from its name alone."""
    for pattern, part in ((ATTN, "attention"), (MLP, "mlp")):
        m = pattern.match(name)
        if m:
            return A.Cell(int(m.group(1)), part, m.group(2))
    layer = re.search(r"layers\.(\d+)\.", name)
    layer = int(layer.group(1)) if layer else None
    kind = ("bias" if name.endswith(".bias") else "lm_head" if name.startswith("lm_head") else
            "embed" if "embed_tokens" in name else "norm" if "norm" in name else None)
    return A.Cell(layer, A.ROW, kind)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cells_of_dense_families(family):
    model, _ = tiny_model(family, layers=3)
    names = dict(model.named_parameters())
    for name, p in names.items():
        (cell, piece), = A.split(name, p)
        assert cell == _expected_dense(name), name
        assert piece.numel() == p.numel()
    order, numel = A.cells(model)
    assert numel.sum() == sum(p.numel() for p in model.parameters())
    block = [c for c in order if c.block]
    assert len(block) == 3 * 7 and {c.component for c in block} == set(A.COMPONENTS)
    rows = {c.component for c in order if not c.block}
    assert {"lm_head", "embed", "norm"} <= rows and ("bias" in rows) == (family == "qwen2")   # qwen2: q/k/v bias
    parts = A.part_masks(block, 3)
    assert [c for c, m in zip(block, parts["v"]) if m] == [A.Cell(i, "attention", "v") for i in range(3)]
    assert {(c.part, c.component) for c, m in zip(block, parts["mlp"]) if m} == {("mlp", x) for x in
                                                                               ("gate", "up", "down")}
    assert {c.layer for c, m in zip(block, parts["middle_third"]) if m} == {1}


def test_cells_of_moe_experts_shared_experts_and_router():
    model, _ = tiny_model("qwen2_moe", layers=3)
    params = dict(model.named_parameters())
    gate_up = "model.layers.2.mlp.experts.gate_up_proj"
    (g, gp), (u, up) = A.split(gate_up, params[gate_up])
    half = params[gate_up].shape[1] // 2
    assert (g, u) == (A.Cell(2, "expert", "gate"), A.Cell(2, "expert", "up"))
    assert torch.equal(gp, params[gate_up][:, :half]) and torch.equal(up, params[gate_up][:, half:])
    assert A.split("model.layers.2.mlp.experts.down_proj", params["model.layers.2.mlp.experts.down_proj"])[0][0] \
        == A.Cell(2, "expert", "down")
    for proj in ("gate", "up", "down"):
        name = f"model.layers.0.mlp.shared_expert.{proj}_proj.weight"
        assert A.split(name, params[name])[0][0] == A.Cell(0, "shared_expert", proj)
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert_gate.weight"):
        assert A.split(name, params[name])[0][0] == A.Cell(1, A.ROW, "router")
    order, numel = A.cells(model)
    assert numel.sum() == sum(p.numel() for p in model.parameters())
    block = [c for c in order if c.block]
    mlp = A.part_masks(block, 3)["mlp"]
    assert {c.part for c, m in zip(block, mlp) if m} == {"expert", "shared_expert"}
    assert not any(c.component == "router" for c in block)
    late = A.part_masks(block, 3)["late_third_mlp"]
    assert {c.layer for c, m in zip(block, late) if m} == {2}


EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")
SHARED = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight$")
ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|shared_expert_gate)\.weight$")


def _moe_pieces(name, t):
    """(layer, 'part:component', piece) of a MoE model's block matrix, written out from its name alone (fused
    gate_up [E, 2I, H]: gate rows :I, up rows I:); ('router', t) for a router; None for any other row."""
    for pattern, part in ((ATTN, "attention"), (EXPERTS, "expert"), (SHARED, "shared_expert")):
        m = pattern.match(name)
        if m and m.group(2) == "gate_up":
            half = t.shape[1] // 2
            return [(int(m.group(1)), "expert:gate", t[:, :half]), (int(m.group(1)), "expert:up", t[:, half:])]
        if m:
            return [(int(m.group(1)), f"{part}:{m.group(2)}", t)]
    return "router" if ROUTER.match(name) else None


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_mass_is_booked_to_experts_and_shared_expert_never_to_the_router(family):
    """Planted gradients in one expert of a fused expert tensor, one expert's down projection, the shared expert
    (qwen2_moe) and, 1e4 times larger, the routers; then everywhere. Per cell, per component and per layer the
    shares equal a brute-force sum of |G|·σ_W over the named tensors' slices with the routers outside the
    denominator; the routers' mass shows only as their own row."""
    model, _ = tiny_model(family, layers=3)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    routers = [n for n, p in params.items() if _moe_pieces(n, p) == "router"]
    assert len(routers) == 3 * (2 if family == "qwen2_moe" else 1)
    sparse = {n: torch.zeros(p.shape) for n, p in params.items()}
    for name, expert in (("model.layers.2.mlp.experts.gate_up_proj", 1), ("model.layers.0.mlp.experts.down_proj", 3)):
        sparse[name][expert] = torch.randn(sparse[name][expert].shape, generator=gen)
    if family == "qwen2_moe":
        sparse["model.layers.1.mlp.shared_expert.up_proj.weight"] = torch.randn(64, 64, generator=gen)
    dense = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    for G in (sparse, dense):
        for n in routers:
            G[n] = 1e4 * torch.randn(params[n].shape, generator=gen)
    order, numel = A.cells(model)
    with A.cell_mass(model, order) as take:
        rows = []
        for G in (sparse, dense):
            _planted(model, G).backward()
            rows.append(take())
    safety = np.array(rows)

    sigma = {n: float(p.detach().std()) for n, p in params.items()}
    cells, entries, router = {}, {}, np.zeros(2)    # {(layer, key): mass per prompt}, {key: entries}
    for n, p in params.items():
        pieces = _moe_pieces(n, p.detach())
        if pieces == "router":
            router += [float(G[n].abs().sum()) * sigma[n] for G in (sparse, dense)]
            continue
        for (layer, key, piece), *grads in zip(pieces or [], *(_moe_pieces(n, G[n]) or [] for G in (sparse, dense))):
            mass = np.array([float(g[2].abs().sum()) * sigma[n] for g in grads])
            cells[layer, key] = cells.get((layer, key), 0) + mass
            entries[key] = entries.get(key, 0) + piece.numel()
    index = {c: i for i, c in enumerate(order)}
    for (layer, key), direct in cells.items():
        part, comp = key.split(":")
        np.testing.assert_allclose(safety[:, index[A.Cell(layer, part, comp)]], direct, rtol=1e-5)

    planted = {key for (layer, key), m in cells.items() if m[0] > 0}
    assert planted == {"expert:gate", "expert:up", "expert:down"} | ({"shared_expert:up"} if family == "qwen2_moe"
                                                                    else set())
    gate_up = params["model.layers.2.mlp.experts.gate_up_proj"]
    half = gate_up.shape[1] // 2
    one_expert = float(sparse["model.layers.2.mlp.experts.gate_up_proj"][1, :half].abs().sum()) * sigma[
        "model.layers.2.mlp.experts.gate_up_proj"]
    assert safety[0, index[A.Cell(2, "expert", "gate")]] == pytest.approx(one_expert, rel=1e-5)

    masses = A.Masses(order, numel, safety, np.ones_like(safety), 3)
    total = sum(cells.values())
    table = masses.component_table()
    assert not [k for k in table.index if "router" in k]
    assert set(table.index) == set(entries)
    for key in entries:
        mass = sum(m for (layer, k), m in cells.items() if k == key)
        assert table.loc[key, "safety_share"] == pytest.approx(mass.sum() / total.sum(), rel=1e-5)
        assert table.loc[key, "entry_share"] == pytest.approx(entries[key] / sum(entries.values()), rel=1e-12)
    layers = masses.layer_table()
    for layer in range(3):
        mass = sum(m for (i, k), m in cells.items() if i == layer)
        assert layers.loc[layer, "safety_share"] == pytest.approx(mass.sum() / total.sum(), rel=1e-5)
    m = A.Masses(order, numel, safety[:1], np.ones((1, len(order))), 3).metrics()
    assert m["block_numel"] == sum(entries.values())
    late = sum(m_[0] for (i, k), m_ in cells.items() if i == 2 and not k.startswith("attention"))
    assert m["parts"]["late_third_mlp"]["safety_share"] == pytest.approx(late / total[0], rel=1e-5)
    assert m["parts"]["mlp"]["safety_share"] == pytest.approx(1.0) and m["parts"]["v"]["safety_share"] == 0.0
    assert m["rows"]["router"]["safety_mass_vs_blocks"] == pytest.approx(router[0] / total[0], rel=1e-5)
    assert router[0] > 1e2 * total[0]            # a router booked into the blocks would dominate every share


def test_thirds_are_symmetric():
    def middle(n):
        return [i for i in range(n) if A.third(i, n) == 1]
    assert middle(24) == list(range(8, 16)) and middle(30) == list(range(10, 20))
    assert middle(32) == list(range(11, 21)) and middle(3) == [1] and middle(2) == []


def _planted(model, G):
    """A loss whose gradient is exactly G (per parameter name)."""
    return sum((p * G[n]).sum() for n, p in model.named_parameters())


def test_planted_gradients_booked_over_block_matrices_only():
    """Two 'prompts' with planted gradients: the hook's per-prompt mass equals Σ|G|·σ_W per cell; the parts'
    shares equal a direct sum over the block matrices (found by name), unchanged by a huge lm_head gradient,
    which shows only as its own row."""
    model, _ = tiny_model("llama", layers=3)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    plants = []
    for lm_scale in (1e6, 1.0):
        G = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        G["lm_head.weight"] *= lm_scale
        plants.append(G)
    order, numel = A.cells(model)
    with A.cell_mass(model, order) as take:
        rows = []
        for G in plants:
            _planted(model, G).backward()
            rows.append(take())
    assert all(p.grad is None for p in model.parameters())      # nothing accumulates
    safety = np.array(rows)
    index = {c: i for i, c in enumerate(order)}
    for k, G in enumerate(plants):
        for n, p in params.items():
            cell = _expected_dense(n)
            if cell.component == "embed":   # booked from the embedding's output (next test)
                continue
            direct = sum(float(G[m].abs().sum()) * float(params[m].detach().std()) for m in params
                         if _expected_dense(m) == cell)
            assert safety[k, index[cell]] == pytest.approx(direct, rel=1e-5)

    blocks = [n for n in params if ATTN.match(n) or MLP.match(n)]
    mass = lambda n: sum(float(G[n].abs().sum()) for G in plants) * float(params[n].detach().std())   # noqa: E731
    total = sum(mass(n) for n in blocks)
    v = [n for n in blocks if ".v_proj." in n]
    mlp = [n for n in blocks if ".mlp." in n]
    middle = [n for n in blocks if ".layers.1." in n]
    null = np.ones_like(safety)
    m = A.Masses(order, numel, safety, null, 3).metrics()
    entries = sum(params[n].numel() for n in blocks)
    assert m["block_numel"] == entries
    for part, names in (("v", v), ("mlp", mlp), ("middle_third", middle)):
        got = m["parts"][part]
        assert got["safety_share"] == pytest.approx(sum(mass(n) for n in names) / total, rel=1e-6)
        assert got["entry_share"] == pytest.approx(sum(params[n].numel() for n in names) / entries, rel=1e-12)
    lm = m["rows"]["lm_head"]
    assert lm["safety_mass_vs_blocks"] == pytest.approx(mass("lm_head.weight") / total, rel=1e-5)
    assert lm["safety_mass_vs_blocks"] > 1e3 and lm["numel_vs_blocks"] == pytest.approx(
        params["lm_head.weight"].numel() / entries)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_embedding_row_equals_its_weight_gradient(family):
    """Untied (llama): the embedding row, booked from the output's gradient per token, equals |∂L/∂E|·σ_E from
    the weight's own gradient, a padding token in the input included; tied (gemma2): the weight's gradient,
    lm_head's use included."""
    model, tok = tiny_model(family, layers=3)
    pad = model.get_input_embeddings().padding_idx
    ids = torch.tensor([[5, 9, 5, 17, 9, 5] + ([pad] if pad is not None else [])])
    order, _ = A.cells(model)
    with A.cell_mass(model, order) as take:
        model(input_ids=ids, labels=ids).loss.backward()
        got = take()
    E = model.get_input_embeddings().weight
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    expect = float(E.grad.abs().sum()) * float(E.detach().std())
    assert got[order.index(A.Cell(None, A.ROW, "embed"))] == pytest.approx(expect, rel=1e-5)
    model.zero_grad()


def test_profile_follows_esi_not_weight_magnitude():
    """Gradient planted on layer 1's V alone, while that matrix holds a small share of |W|: V and the middle third
    hold the whole mass. Scaling a matrix by 5 scales its σ_W and so its ESI mass by 5."""
    model, _ = tiny_model("llama", layers=3)
    params = dict(model.named_parameters())
    target = "model.layers.1.self_attn.v_proj.weight"
    G = {n: torch.zeros(p.shape) for n, p in params.items()}
    G[target] = torch.ones(params[target].shape)
    order, numel = A.cells(model)
    with A.cell_mass(model, order) as take:
        _planted(model, G).backward()
        before = take()
    with torch.no_grad():
        params[target].mul_(5.0)
    with A.cell_mass(model, order) as take:   # σ_W is read on entry
        _planted(model, G).backward()
        after = take()
    i = order.index(A.Cell(1, "attention", "v"))
    assert after[i] == pytest.approx(5 * before[i], rel=1e-6) and before.sum() == before[i]
    parts = A.Masses(order, numel, np.stack([before, after]), np.ones((2, len(order))), 3).metrics()["parts"]
    assert parts["v"]["safety_share"] == 1.0 and parts["middle_third"]["safety_share"] == 1.0
    assert parts["mlp"]["safety_share"] == 0.0
    w = {c: 0.0 for c in order}
    for n, p in params.items():
        for c, piece in A.split(n, p.detach()):
            w[c] += float(piece.abs().sum())
    blocks = [c for c in order if c.block]
    assert sum(w[c] for c in blocks if c.component == "v") / sum(w[c] for c in blocks) < 0.2   # |W| would say so


def test_part_estimates_on_planted_masses():
    """Safety mass concentrated in the member cells, null spread by size: the effect is the pooled share
    difference, its interval excludes 0 and p is small; the same profile twice gives an interval around 0."""
    rng = np.random.default_rng(0)
    member = np.array([True, False, False, False])
    safety = rng.uniform(0.5, 1.0, (32, 4)) * np.array([6.0, 1.0, 1.0, 1.0])
    null = rng.uniform(0.5, 1.0, (32, 4))
    got = A.part_estimates(safety, null, member, 0.25)
    s_share = safety[:, 0].sum() / safety.sum()
    n_share = null[:, 0].sum() / null.sum()
    assert got["effect"] == pytest.approx(s_share - n_share) and got["n"] == 32 and got["n_null"] == 32
    assert 0 < got["ci"][0] < got["effect"] < got["ci"][1] and got["p"] < 0.01
    assert got["safety_vs_entries"]["effect"] == pytest.approx(s_share - 0.25)
    assert got["null_vs_entries"]["ci"][0] < 0 < got["null_vs_entries"]["ci"][1] + 0.05
    same = A.part_estimates(safety, safety, member, 0.25)
    assert same["effect"] == 0.0 and same["ci"][0] < 0 < same["ci"][1] and same["p"] > 0.5
    flipped = A.part_estimates(null, safety, member, 0.25)
    assert flipped["effect"] == pytest.approx(n_share - s_share) and flipped["ci"][1] < 0


def test_response_likelihood_objective_is_the_lm_gradient():
    """The null objective: ∂ log p(own greedy response | prompt)/∂θ, as a plain cross-entropy backward gives it."""
    model, tok = tiny_model("llama")
    prompts = ["Write a poem about the sea."]
    gen = esi.respond(model, tok, prompts, 5, "You are a helpful assistant.")
    grads = esi.esi_gradients(model, tok, None, prompts, 5, "fixed", objective="response_likelihood",
                              progress=False, generated=gen)
    ids, plen = gen[0]
    model.zero_grad()
    logits = model(input_ids=ids[None]).logits[0, plen - 1:-1]
    torch.nn.functional.cross_entropy(logits, ids[plen:], reduction="sum").backward()
    for n, g in grads.items():
        ref = dict(model.named_parameters())[n].grad
        assert torch.allclose(g, -ref, atol=1e-6, rtol=1e-4), n
    model.zero_grad()
