"""Deployment test fixtures: a tiny random GAM checkpoint for the tests that run the server."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gam_model.checkpoint import CheckpointMeta, save_checkpoint
from gam_model.tokenizer import Tokenizer
from tests.conftest import tiny_model

WORDS = ["<eos>", "<unk>", "the", "a", "of", "and", "to", "in", "is", "was", "it", "that", "on", "for", "as"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GAM with a word-level tokenizer (id 0 is eos), saved as a real checkpoint directory."""
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(hf, eos_token_id=0)
    model = tiny_model(seed=1, vocab_size=len(WORDS))
    d = tmp_path_factory.mktemp("ckpt") / "tiny-deploy"
    save_checkpoint(d, model, tok, CheckpointMeta(model_name="tiny-deploy", eos_token_id=0))
    return d
