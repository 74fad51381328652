"""Exact perplexity and bits per byte of a GAM model on a text (DESIGN 1.3 semantics; see gam_model.scoring)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from gam_model.data import encode_stream
from gam_model.model import GAM
from gam_model.scoring import next_token_logits
from gam_model.tokenizer import Tokenizer


@dataclass
class EvalResult:
    """Totals over one text; nll in nats."""

    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text
    nll: float

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@torch.no_grad()
def score_tokens(model: GAM, ids: Tensor, batch_size: int = 256, progress: bool = False) -> tuple[float, int]:
    """Sum of -log p(ids[i+1] | ids[..i]) over i = 0..N-2 under the sliding-window semantics; (nll, count)."""
    chunks = next_token_logits(
        model, ids, batch_size, wrap=lambda it: tqdm(it, desc="eval", disable=not progress, mininterval=5)
    )
    nll = sum(F.cross_entropy(logits.float(), t, reduction="sum").item() for logits, t in chunks)
    return float(nll), max(len(ids) - 1, 0)


@torch.no_grad()
def score_chunks(model: GAM, ids: Tensor, progress: bool = False) -> tuple[float, int]:
    """The usual training-style estimate (not the serving semantics): non-overlapping block_size chunks, each token
    scored with context from its chunk's start only; (nll, count). Cheap, and what nanoGPT-style papers report."""
    model.eval()
    dev = model.pos_embedding.weight.device
    ids = ids.to(dev)
    bs, N = model.config.block_size, len(ids)
    nll = 0.0
    for s in tqdm(range(0, N - 1, bs), desc="eval", disable=not progress, mininterval=5):
        e = min(s + bs, N - 1)
        nll += F.cross_entropy(model(ids[s:e].unsqueeze(0))[0].float(), ids[s + 1 : e + 1], reduction="sum").item()
    return nll, N - 1


MODES = ("sliding", "chunked")


def evaluate_text(
    model: GAM, tok: Tokenizer, text: str, batch_size: int = 256, progress: bool = False, mode: str = "sliding"
) -> EvalResult:
    """Score a whole text as one stream (opened by the tokenizer's start token, so every text token is predicted).

    mode "sliding" is exact for the served semantics (DESIGN 1.3); "chunked" is the training-style estimate.
    """
    ids = torch.from_numpy(encode_stream(tok, text))
    if mode == "sliding":
        nll, n = score_tokens(model, ids, batch_size=batch_size, progress=progress)
    elif mode == "chunked":
        nll, n = score_chunks(model, ids, progress=progress)
    else:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return EvalResult(tokens=n, bytes=len(text.encode("utf-8")), nll=nll)
