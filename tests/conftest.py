"""Shared fixtures: tiny random GAM models on CPU."""

from __future__ import annotations

import pytest
import torch

from gam_model.config import GAMConfig
from gam_model.model import GAM


def tiny_model(seed: int = 0, **kw) -> GAM:
    """A small random GAM in eval mode (fp32, CPU)."""
    args = dict(vocab_size=97, block_size=32, n_embd=32, n_layer=2, n_slots=16, conv_kernel=3, dropout=0.0)
    args.update(kw)
    torch.manual_seed(seed)
    m = GAM(GAMConfig(**args)).eval()
    # non-trivial LayerNorm/bias values so a wrong index or offset shows up
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture
def model() -> GAM:
    return tiny_model()
