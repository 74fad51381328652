"""Fixtures the gam_model tests share."""

from __future__ import annotations

import pytest

from gam_model.tokenizer import Tokenizer
from tests.gam_model.tokenizers_for_tests import byte_bpe


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """The test byte-level BPE (deterministic, read-only)."""
    return byte_bpe()
