"""One rank of tests/test_fsdp.py, started by `distributed.relaunch("fsdp_worker:main", 2, [out_dir])` (1, 2 or 4
ranks; on CUDA under nccl as well as on the CPU under gloo).

Every rank builds the same tiny model, keeps unsharded copies as the one-process reference, shards the model
with FSDP2 and checks its local shards against the matching rows of the reference: SNIP and Wanda scores,
top-k masks (matrix, row and global, largest and smallest, on tie-heavy scores), ablated logits and five
MaskedAdamW steps of data-parallel training. Rank 0 writes what was checked to <out_dir>/checked.json."""
from __future__ import annotations

import copy
import json
import sys

import torch

from saferegions import chat, distributed, tiny
from saferegions.hooks import zeroed_weights
from saferegions.methods.snip import snip_scores
from saferegions.methods.wanda import wanda_scores
from saferegions.optim import MaskedAdamW, build_param_groups
from saferegions.regions import top_fraction, top_fraction_sharded

FAMILIES = ("llama", "qwen3_moe")
PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis to a child, please.",
           "What is 12 plus 30?", "Tell me a story."]
RESPONSES = ["Sure, here is a step by step guide.", "I'm sorry, but I can't.", "Once upon a time",
             "Answer: 42.", "The quick brown fox."]


def rows(ref: torch.Tensor, shard_of: torch.Tensor) -> torch.Tensor:
    """The rows of the unsharded `ref` that this rank's shard of the same parameter holds."""
    start = distributed.row_offset(shard_of)
    return ref[start:start + distributed.local(shard_of).shape[0]]


def close(got: dict, want: dict, params: dict, rtol: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for n in want:
        w = rows(want[n], params[n])
        torch.testing.assert_close(got[n], w, rtol=rtol, atol=rtol * float(want[n].abs().max()), msg=n)


def same_masks(got: dict, want: dict, params: dict, what: str) -> int:
    """Asserts identical sets; returns the selected count over all ranks."""
    for n in want:
        assert torch.equal(got[n], rows(want[n], params[n])), f"{what}: {n}"
    return int(distributed.all_reduce(torch.tensor(sum(int(m.sum()) for m in got.values()))))


def check(family: str) -> dict:
    dev = distributed.device()        # the CPU under gloo, this rank's GPU under nccl
    model, tok = tiny.tiny_model(family)
    model.to(dev)
    ref = copy.deepcopy(model)
    distributed.shard(model)
    params = dict(model.named_parameters())
    done = {}

    batches = list(chat.response_batches(tok, PROMPTS, RESPONSES, batch_size=2))   # 3 batches: one rank idles once
    snip_ref, snip = snip_scores(ref, batches, progress=False), snip_scores(model, batches, progress=False)
    close(snip, snip_ref, params)
    wanda_ref, wanda = wanda_scores(ref, batches, progress=False), wanda_scores(model, batches, progress=False)
    close(wanda, wanda_ref, params)
    done["scores"] = sorted(snip)

    # Selection on the same numbers in both runs; rounding makes many ties at every threshold.
    tied = {n: (s / s.max() * 50).round() for n, s in snip_ref.items()}
    local_tied = {n: rows(s, params[n]) for n, s in tied.items()}
    for group in ("matrix", "row", "global"):
        for largest in (True, False):
            want = top_fraction(tied, 0.1, group, largest).masks
            got = top_fraction_sharded(local_tied, 0.1, group, largest).masks
            n = same_masks(got, want, params, f"{group} largest={largest}")
            assert n == sum(int(m.sum()) for m in want.values()) > 0
    done["topk"] = True

    region = top_fraction(snip_ref, 0.05, "matrix").masks
    local_region = {n: rows(m, params[n]) for n, m in region.items()}
    ids = batches[0]["input_ids"].to(dev)
    with torch.no_grad():
        intact = model(input_ids=ids).logits
        with zeroed_weights(ref, region):
            want = ref(input_ids=ids).logits
        with zeroed_weights(model, local_region):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - intact).abs().max() > 1e-3                     # the ablation changed the model
        torch.testing.assert_close(model(input_ids=ids).logits, intact, rtol=0, atol=0)   # and was undone
    done["ablation"] = True

    torch.manual_seed(1)
    data = torch.randint(4, len(tok), (4, 12)).to(dev)
    per = len(data) // distributed.world_size()                         # data parallel: rows split over ranks
    half = data[per * distributed.rank():per * (distributed.rank() + 1)]
    ref.train(), model.train()
    opt_ref = MaskedAdamW(build_param_groups(ref, region), lr=1e-3, mode="sparse")
    opt = MaskedAdamW(build_param_groups(model, local_region), lr=1e-3, mode="sparse")
    for _ in range(5):
        for m, o, x in ((ref, opt_ref, data), (model, opt, half)):
            o.zero_grad()
            m(input_ids=x, labels=x).loss.backward()
            o.step()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(distributed.local(p.detach()), rows(ref_params[n].detach(), p),
                                   rtol=1e-5, atol=1e-5, msg=n)
    moved = sum(int((distributed.local(p.detach()) != rows(q.to(dev), p)).sum())
                for (n, p), q in zip(model.named_parameters(), tiny.tiny_model(family)[0].parameters()))
    assert distributed.all_reduce(torch.tensor(moved)) > 0                   # training changed something
    done["masked_adamw"] = True
    return done


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    checked = {f: check(f) for f in FAMILIES}
    with distributed.on_main(f"{out_dir}/checked.json") as tmp:
        if tmp is not None:
            tmp.write_text(json.dumps({"world_size": distributed.world_size(), **checked}))


if __name__ == "__main__":
    main(sys.argv[1])
