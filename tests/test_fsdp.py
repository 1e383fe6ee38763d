"""FSDP2 on 2 CPU ranks (gloo), started as a torchrun subprocess: SNIP and Wanda scores of local shards equal the
one-process scores, sharded top-k masks are the one-process sets (ties included), ablated logits are equal, and
five data-parallel MaskedAdamW steps equal one-process training, on a tiny llama and a tiny qwen3_moe
(tests/fsdp_worker.py holds the checks; each rank compares its shards with an unsharded copy)."""
import json
import os

import pytest
import torch

from conftest import ROOT
from saferegions import config, distributed


def test_two_rank_fsdp_matches_one_process(tmp_path):
    env = {"OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    distributed.relaunch("fsdp_worker:main", 2, [tmp_path], env=env, timeout=600)
    checked = json.loads((tmp_path / "checked.json").read_text())
    assert checked["world_size"] == 2
    for family in ("llama", "qwen3_moe"):
        assert checked[family]["topk"] and checked[family]["ablation"] and checked[family]["masked_adamw"]
        assert any("experts" in n for n in checked[family]["scores"]) == (family == "qwen3_moe")


def test_run_distributed_params_are_checked():
    assert config.RunCfg(distributed="fsdp", nproc=2).nproc == 2
    with pytest.raises(config.ConfigError):
        config.RunCfg(distributed="ddp")
    with pytest.raises(config.ConfigError):
        config.RunCfg(nproc=0)


def test_outside_a_process_group_everything_is_local():
    t = torch.arange(6.0).view(3, 2)
    assert distributed.local(t) is t and distributed.row_offset(t) == 0 and not distributed.active()
    assert distributed.all_reduce(t) is t and distributed.every_rank(False) is False
