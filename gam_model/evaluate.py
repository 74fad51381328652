"""Exact perplexity and bits per byte of a GAM model on a text (DESIGN 1.3 semantics).

The logits after N tokens are the forward over the last min(N, block_size) tokens. The first block_size
predictions come from one forward of the first block_size tokens. Past it, every token sits at position
block_size-1 of its window, and its logits depend only on the last R tokens (R = receptive field), so it is
scored by a batch of R-token windows at positions block_size-R..block_size-1. Each block trims the k-1
positions whose conv reached outside the window, so a window costs R + (R-k+1) + ... + 1 positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from gam_model.data import encode_stream
from gam_model.model import GAM
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


def tail_window_logits(model: GAM, win: Tensor) -> Tensor:
    """Logits of the last token of each window, placed at positions block_size-W..block_size-1: win (B, W) -> (B, V).

    Exact for the full-context semantics when W >= R (the conv zero-padding never reaches the last token).
    """
    bs, k1 = model.config.block_size, model.config.history
    W = win.shape[1]
    pos = torch.arange(bs - W, bs, device=win.device)  # (W,)
    x = model.token_embedding(win) + model.pos_embedding(pos)  # (B, W, C)
    for blk in model.blocks:
        x, _ = blk(x)
        if x.shape[1] > 1:
            x = x[:, min(k1, x.shape[1] - 1) :]  # drop outputs whose conv read the window's zero padding
    return model.head(model.ln_f(x[:, -1]))  # (B, V)


@torch.no_grad()
def score_tokens(model: GAM, ids: Tensor, batch_size: int = 256, progress: bool = False) -> tuple[float, int]:
    """Sum of -log p(ids[i+1] | ids[..i]) over i = 0..N-2 under the sliding-window semantics; (nll, count)."""
    model.eval()
    cfg = model.config
    dev = model.token_embedding.weight.device
    ids = ids.to(dev)
    N, bs, R = len(ids), cfg.block_size, cfg.receptive_field
    if N < 2:
        return 0.0, 0
    head = min(N - 1, bs)
    logits = model(ids[:head].unsqueeze(0))[0]  # (head, V): contexts ids[0..i], i < block_size
    nll = F.cross_entropy(logits.float(), ids[1 : head + 1], reduction="sum").item()
    rel = torch.arange(-R + 1, 1, device=dev)  # (R,)
    starts = range(bs, N - 1, batch_size)
    for i0 in tqdm(starts, desc="eval", disable=not progress, mininterval=5):
        i = torch.arange(i0, min(i0 + batch_size, N - 1), device=dev)  # (b,) last context token of each window
        win = ids[i.unsqueeze(1) + rel]  # (b, R)
        nll += F.cross_entropy(tail_window_logits(model, win).float(), ids[i + 1], reduction="sum").item()
    return nll, N - 1


@torch.no_grad()
def score_chunks(model: GAM, ids: Tensor, progress: bool = False) -> tuple[float, int]:
    """The usual training-style estimate (not the serving semantics): non-overlapping block_size chunks, each token
    scored with context from its chunk's start only; (nll, count). Cheap, and what nanoGPT-style papers report."""
    model.eval()
    dev = model.token_embedding.weight.device
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
