"""Checkpoint directories: round trip keeps logits; every broken directory gives a CheckpointError naming why."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gam_model.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_config, save_checkpoint
from tests.conftest import tiny_model
from tests.gam_model.tokenizers_for_tests import byte_bpe

CFG = dict(vocab_size=300, block_size=24, n_embd=32, n_layer=2, n_slots=8, conv_kernel=3)


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(seed=5, **CFG)
    tok = byte_bpe()
    meta = CheckpointMeta(
        model_name="tiny", eos_token_id=tok.eos_token_id, special_tokens={"eos_token": "<|endoftext|>"}
    )
    d = save_checkpoint(tmp_path / "ckpt", model, tok, meta)
    return model, d


def test_round_trip_same_logits_and_meta(saved):
    model, d = saved
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "head.weight" not in load_file(str(d / "model.safetensors"))  # tied: stored once
    loaded, tok, meta = load_checkpoint(d)
    idx = torch.randint(0, CFG["vocab_size"], (3, CFG["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    assert loaded.head.weight is loaded.token_embedding.weight  # still tied after loading
    assert (meta.model_name, meta.eos_token_id) == ("tiny", tok.eos_token_id)
    assert tok.encode("Homarus é 🚀") == byte_bpe().encode("Homarus é 🚀")


def test_load_in_bf16(saved):
    model, d = saved
    loaded, _, _ = load_checkpoint(d, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    idx = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert (model(idx) - loaded(idx).float()).abs().max() < 0.1


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(saved, name):
    _, d = saved
    (d / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(d)


def test_pickle_beside_missing_safetensors_gets_a_hint(saved):
    model, d = saved
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "model.pt")
    with pytest.raises(CheckpointError, match=r"found model\.pt: convert it with gam-import"):
        load_checkpoint(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_bad_json(saved):
    _, d = saved
    (d / "config.json").write_text('{"vocab_size": 300,')
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(d)


def test_config_missing_a_hyper_parameter(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    del cfg["n_layer"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing n_layer"):
        read_config(d)


def test_config_that_does_not_match_the_weights(saved):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_slots"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.memory_bank has shape \(8, 32\), config expects \(16, 32\)"):
        load_checkpoint(d)


def test_weights_with_a_wrong_shape_or_missing_tensor(saved):
    _, d = saved
    sd = load_file(str(d / "model.safetensors"))
    sd["ln_f.weight"] = torch.ones(31)
    del sd["blocks.1.gate.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert "ln_f.weight has shape (31,), config expects (32,)" in str(e.value)
    assert "missing tensor blocks.1.gate.bias (64,)" in str(e.value)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    model = tiny_model(seed=5, **{**CFG, "vocab_size": 100})
    d = save_checkpoint(tmp_path / "small", model, byte_bpe(), CheckpointMeta())
    with pytest.raises(CheckpointError, match="tokenizer has 300 tokens, model vocab_size is 100"):
        load_checkpoint(d)


@pytest.mark.parametrize(("key", "value"), [("eos_token_id", 300), ("eos_token_id", -1), ("eos_token_id", "0"),
                                            ("bos_token_id", 10**6), ("eos_token_id", True)])  # fmt: skip
def test_special_token_id_outside_the_vocabulary(saved, key, value):
    """An eos or bos id that is not a token id of the model is refused with its name: an eos the model can never
    sample meant that no generation ever ended at eos (and a string id never equalled a sampled one)."""
    _, d = saved
    raw = json.loads((d / "config.json").read_text())
    raw[key] = value
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=key):
        read_config(d)
