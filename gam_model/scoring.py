"""Next-token log-probabilities of a given token sequence under the served semantics (DESIGN 1.3).

The logits after N tokens are the forward over the last min(N, block_size) tokens. The first block_size
predictions come from one forward of the first block_size tokens. Past it, every token sits at position
block_size-1 of its window, and its logits depend only on the last R tokens (R = receptive field), so it is
scored by a batch of R-token windows at positions block_size-R..block_size-1. Each block trims the k-1
positions whose conv reached outside the window, so a window costs R + (R-k+1) + ... + 1 positions.
Used by gam-eval (perplexity) and by the server's prompt logprobs; no dependency beyond torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from gam_model.model import GAM
from gam_model.sampling import top_n_ranked


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


def range_logits(model: GAM, ids: Tensor, a: int, b: int) -> Tensor:
    """Logits at positions a..b-1 (b <= block_size) of one sequence ids (N,): (b-a, V), exact.

    A forward over ids[s:b] at positions s..b-1 with s = max(0, a-R+1): the conv's zero padding at s (wrong
    unless s = 0) reaches only the R-1 positions before a, whose outputs are dropped.
    """
    s = max(0, a - model.config.receptive_field + 1)
    pos = torch.arange(s, b, device=ids.device)  # (b-s,)
    x = (model.token_embedding(ids[s:b]) + model.pos_embedding(pos)).unsqueeze(0)  # (1, b-s, C)
    for blk in model.blocks:
        x, _ = blk(x)
    return model.head(model.ln_f(x[0, a - s :]))  # (b-a, V)


def next_token_logits(
    model: GAM,
    ids: Tensor,
    batch_size: int = 256,
    wrap: Callable[[Iterable[int]], Iterable[int]] = iter,
    head_chunk: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Logits predicting ids[1:] under the sliding-window semantics, in order and in chunks: (logits (n, V), targets (n,)).

    The first min(N-1, block_size) positions come from forwards of `head_chunk` positions (default: all in
    one forward); past block_size, chunks of `batch_size` R-token windows (see `tail_window_logits`). `wrap`
    wraps the window chunks' start indices (a progress bar). Call under torch.no_grad or inference_mode.
    """
    model.eval()
    cfg = model.config
    dev = model.pos_embedding.weight.device
    ids = ids.to(dev)
    N, bs, R = len(ids), cfg.block_size, cfg.receptive_field
    if N < 2:
        return
    head = min(N - 1, bs)  # positions 0..head-1 predict ids[1..head]: contexts ids[0..i], i < block_size
    step = head_chunk or head
    for a in range(0, head, step):
        b = min(a + step, head)
        yield range_logits(model, ids, a, b), ids[a + 1 : b + 1]  # (b-a, V), (b-a,)
    rel = torch.arange(-R + 1, 1, device=dev)  # (R,)
    starts = range(bs, N - 1, batch_size)
    for i0 in wrap(starts):  # wrap: e.g. a progress bar
        i = torch.arange(i0, min(i0 + batch_size, N - 1), device=dev)  # (b,) last context token of each window
        yield tail_window_logits(model, ids[i.unsqueeze(1) + rel]), ids[i + 1]  # (b, V), (b,)


@dataclass
class TokenLogprobs:
    """Log-probabilities of a sequence's own tokens ids[1:] (the first token has no context), with top-n alternatives."""

    logprobs: list[float]  # (N-1,) log p(ids[i+1] | ids[..i])
    top_ids: list[list[int]]  # (N-1, n) the n most likely next tokens at each position, best first
    top_logprobs: list[list[float]]  # (N-1, n)


class PromptScorer:
    """`token_logprobs` in pieces: each `advance()` scores one chunk, so a server can interleave other work."""

    def __init__(
        self, model: GAM, ids: Tensor, top_n: int = 0, batch_size: int = 256, head_chunk: int | None = None
    ) -> None:
        self.top_n = top_n
        self.total = max(len(ids) - 1, 0)  # tokens to score
        self.result = TokenLogprobs([], [], [])
        self._chunks = next_token_logits(model, ids, batch_size, head_chunk=head_chunk)

    @property
    def done(self) -> bool:
        return len(self.result.logprobs) == self.total

    @torch.no_grad()
    def advance(self) -> int:
        """Score the next chunk (the first block_size tokens at once, then `batch_size` windows); returns its size."""
        if self.done:
            return 0
        logits, t = next(self._chunks)  # (n, V), (n,)
        lp = logits.float().log_softmax(dim=-1)  # (n, V)
        out = self.result
        out.logprobs += lp.gather(1, t.unsqueeze(1)).squeeze(1).tolist()
        if self.top_n > 0:
            vals, idx = top_n_ranked(lp, min(self.top_n, lp.shape[-1]))  # (n, top_n)
            out.top_ids += idx.tolist()
            out.top_logprobs += vals.tolist()
        else:
            out.top_ids += [[] for _ in range(len(t))]
            out.top_logprobs += [[] for _ in range(len(t))]
        return len(t)


def token_logprobs(
    model: GAM, ids: Tensor, top_n: int = 0, batch_size: int = 256, head_chunk: int | None = None
) -> TokenLogprobs:
    """Every token's log-probability given the tokens before it (the served semantics), and the top_n alternatives.

    What a server returns as prompt logprobs (TGI `decoder_input_details`, OpenAI `echo` + `logprobs`): O(N) work,
    unlike the O(R) prefill. Log-softmax in float32 of the model's logits.
    """
    scorer = PromptScorer(model, ids, top_n, batch_size, head_chunk)
    while not scorer.done:
        scorer.advance()
    return scorer.result
