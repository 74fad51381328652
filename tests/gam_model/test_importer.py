"""gam-import: a reference `torch.save(state_dict)` becomes a checkpoint directory with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gam_model.checkpoint import CheckpointError, load_checkpoint
from gam_model.cli.import_checkpoint import main as import_main
from gam_model.importer import import_reference, load_reference_state_dict
from tests.conftest import tiny_model
from tests.gam_model.tokenizers_for_tests import whitespace_bpe

CFG = dict(vocab_size=300, block_size=24, n_embd=32, n_layer=3, n_slots=8, conv_kernel=4)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    whitespace_bpe().save(path)
    return path


@pytest.fixture
def reference(tmp_path):
    """A random GAM saved the way the paper's code saves it: torch.save(model.state_dict()), head.weight included."""
    model = tiny_model(seed=11, **CFG)
    sd = model.state_dict()
    assert "head.weight" in sd
    path = tmp_path / "paper.pt"
    torch.save(sd, path)
    return model, path


class RefBlock(nn.Module):
    """The paper's block as DESIGN 1.1 states it, with the reference's module names and its conv padding trick."""

    def __init__(self, d: int, slots: int, k: int) -> None:
        super().__init__()
        self.causal_conv = nn.Conv1d(d, d, k, padding=k - 1, groups=d)  # pads both sides; the tail is sliced off
        self.memory_bank = nn.Parameter(torch.randn(slots, d))
        self.gate = nn.Linear(d, 2 * d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln1(x)  # (B, T, C)
        local = self.causal_conv(h.transpose(1, 2))[:, :, : x.shape[1]].transpose(1, 2)
        glob = F.softmax(h @ self.memory_bank.T, dim=-1) @ self.memory_bank
        gl, gg = self.gate(h).chunk(2, dim=-1)
        x = x + torch.sigmoid(gl) * local + torch.sigmoid(gg) * glob
        return x + self.ffn(self.ln2(x))


class RefModel(nn.Module):
    """Stand-in for the reference `GAM_Model` (embedding tied to the head, dropout module without parameters)."""

    def __init__(self, vocab_size, block_size, n_embd, n_layer, n_slots, conv_kernel) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.pos_embedding = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(0.1)
        self.blocks = nn.ModuleList(RefBlock(n_embd, n_slots, conv_kernel) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.token_embedding.weight = self.head.weight

    def forward(self, idx):
        x = self.dropout(self.token_embedding(idx) + self.pos_embedding(torch.arange(idx.shape[1])))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def test_reference_structured_model_imports_with_same_logits(tokenizer_json, tmp_path):
    torch.manual_seed(2)
    ref = RefModel(**CFG).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor shows up
        for name, p in ref.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    pt = tmp_path / "gam_model.pt"
    torch.save(ref.state_dict(), pt)
    out = import_reference(pt, tokenizer_json, tmp_path / "out", overrides={"block_size": CFG["block_size"]})
    assert logits_diff(ref, load_checkpoint(out)[0]) <= 1e-4


def logits_diff(a, b) -> float:
    idx = torch.randint(0, CFG["vocab_size"], (2, CFG["block_size"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((a(idx) - b(idx)).abs().max())


def test_cli_import_infers_config_and_keeps_logits(reference, tokenizer_json, tmp_path, capsys):
    model, pt = reference
    out = tmp_path / "imported"
    import_main(["--state-dict", str(pt), "--tokenizer", str(tokenizer_json), "--out", str(out), "--name", "paper-gam"])
    assert "wrote" in capsys.readouterr().out
    loaded, tok, meta = load_checkpoint(out)
    assert loaded.config.to_dict() == {**CFG, "dropout": 0.0}  # every size inferred from the shapes
    assert logits_diff(model, loaded) <= 1e-4
    assert meta.model_name == "paper-gam"
    assert meta.eos_token_id == tok.token_to_id("[EOS]")  # found among the common spellings
    assert (out / "README.md").read_text().startswith("# paper-gam")
    assert json.loads((out / "config.json").read_text())["imported_from"]["file"] == "paper.pt"


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_wrappers_and_prefixes(reference, tokenizer_json, tmp_path, prefix):
    model, _ = reference
    wrapped = {
        "model_state_dict": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 3e-4}]},
        "epoch": 3,
        "config": {"VOCAB_SIZE": 300, "BLOCK_SIZE": 24, "N_EMBED": 32, "DROPOUT": 0.1},
    }
    pt = tmp_path / "wrapped.pt"
    torch.save(wrapped, pt)
    sd, hparams = load_reference_state_dict(pt)
    assert set(sd) == set(model.state_dict()) and hparams["N_EMBED"] == 32
    out = import_reference(pt, tokenizer_json, tmp_path / "out", eos_token="[EOS]")
    assert logits_diff(model, load_checkpoint(out)[0]) <= 1e-4


def test_config_file_with_reference_names(reference, tokenizer_json, tmp_path):
    model, pt = reference
    hp = tmp_path / "hparams.json"
    hp.write_text(
        json.dumps(
            {
                "VOCAB_SIZE": 300,
                "BLOCK_SIZE": 24,
                "N_EMBED": 32,
                "N_LAYER": 3,
                "NUM_MEMORY_SLOTS": 8,
                "CONV_KERNEL_SIZE": 4,
                "DROPOUT": 0.1,
            }
        )
    )
    out = tmp_path / "out"
    import_main(["--state-dict", str(pt), "--tokenizer", str(tokenizer_json), "--out", str(out), "--config", str(hp)])
    assert logits_diff(model, load_checkpoint(out)[0]) <= 1e-4


def test_config_that_contradicts_the_tensors_is_a_clear_error(reference, tokenizer_json, tmp_path):
    _, pt = reference
    with pytest.raises(CheckpointError) as e:
        import_reference(pt, tokenizer_json, tmp_path / "out", overrides={"n_embd": 48})
    assert "token_embedding.weight has shape (300, 32), config expects (300, 48)" in str(e.value)
    with pytest.raises(CheckpointError, match=r"unexpected tensor blocks\.2\.memory_bank"):
        import_reference(pt, tokenizer_json, tmp_path / "out", overrides={"n_layer": 2})
    with pytest.raises(SystemExit, match=r"gam-import: (.|\n)*config expects"):
        import_main(
            [
                "--state-dict",
                str(pt),
                "--tokenizer",
                str(tokenizer_json),
                "--out",
                str(tmp_path / "o"),
                "--n-slots",
                "16",
            ]
        )


def test_bad_tensor_shape_and_missing_tensor(reference, tokenizer_json, tmp_path):
    model, _ = reference
    sd = dict(model.state_dict())
    sd["blocks.1.gate.weight"] = torch.zeros(10, 32)
    del sd["blocks.0.ln2.bias"]
    pt = tmp_path / "bad.pt"
    torch.save(sd, pt)
    with pytest.raises(CheckpointError) as e:
        import_reference(pt, tokenizer_json, tmp_path / "out")
    assert "blocks.1.gate.weight has shape (10, 32), config expects (64, 32)" in str(e.value)
    assert "missing tensor blocks.0.ln2.bias (32,)" in str(e.value)
    assert not (tmp_path / "out").exists()


class NotATensor:
    """Any class: unpickling it would run arbitrary code paths, so weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickle_with_a_non_tensor_object_is_refused(reference, tokenizer_json, tmp_path, capsys):
    model, _ = reference
    pt = tmp_path / "evil.pt"
    torch.save({**model.state_dict(), "extra": NotATensor()}, pt)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        import_reference(pt, tokenizer_json, tmp_path / "out")
    assert "unpickled!" not in capsys.readouterr().out


def test_non_tensor_plain_value_and_missing_file(reference, tokenizer_json, tmp_path):
    model, _ = reference
    pt = tmp_path / "mixed.pt"
    torch.save({"weights": {**model.state_dict()}, "note": "hi"}, pt)
    with pytest.raises(CheckpointError, match="no state dict found"):
        import_reference(pt, tokenizer_json, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such file"):
        import_reference(tmp_path / "nope.pt", tokenizer_json, tmp_path / "out")


def test_unknown_eos_token(reference, tokenizer_json, tmp_path):
    _, pt = reference
    with pytest.raises(CheckpointError, match="'<nope>' is not in the tokenizer"):
        import_reference(pt, tokenizer_json, tmp_path / "out", eos_token="<nope>")
