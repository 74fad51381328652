"""Batched prefill and decode over a slot pool: the exact O(1)-per-token generation path."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gam_model.model import GAM
from gam_model.state import DecodeState


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch-size buckets 1, 2, 4, ... up to max_batch (inclusive)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def pad_to(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


class Decoder:
    """Owns a model and its DecodeState; prefill admits sequences, step advances any set of slots by one token.

    Logits are returned as float32 (B, V). Rows at positions < block_size take the cached step; rows past it
    take the sliding-window step (DESIGN 1.3). Batches are padded to power-of-two buckets with the scratch
    slot, so every shape the step sees is one of a few static ones.
    """

    def __init__(self, model: GAM, num_slots: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        self.model = model.to(self.device, self.dtype).eval()
        self.config = model.config
        self.state = DecodeState(self.config, num_slots, self.device, self.dtype)
        self.buckets = bucket_sizes(num_slots)
        self.tokens_prefilled = 0  # tokens pushed through the model by prefill (work, not prompt length)

    # -- slots -------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        return self.state.allocate()

    def free(self, slot: int) -> None:
        self.state.free(slot)

    def length(self, slot: int) -> int:
        return int(self.state.lengths[slot])

    # -- prefill -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> Tensor:
        """Reset `slots` and feed each its prompt; returns next-token logits (B, V). O(R) work per prompt."""
        cfg, st = self.config, self.state
        R, bs = cfg.receptive_field, cfg.block_size
        if len(slots) != len(prompts) or not slots:
            raise ValueError("prefill needs one non-empty prompt per slot")
        W = min(R, max(len(p) for p in prompts))
        idx = torch.zeros(len(slots), W, dtype=torch.long)
        win = torch.zeros(len(slots), R, dtype=torch.long)
        last_pos, valid = [], []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError("empty prompt")
            tail = list(p[-W:])
            idx[i, W - len(tail):] = torch.tensor(tail)
            tail_r = list(p[-R:])
            win[i, R - len(tail_r):] = torch.tensor(tail_r)
            last_pos.append(min(len(p), bs) - 1)
            valid.append(len(tail))
        dev = self.device
        self.tokens_prefilled += idx.numel()
        logits, hist = self.model.window_forward(
            idx.to(dev), torch.tensor(last_pos, device=dev), torch.tensor(valid, device=dev))
        s = st.index(list(slots))
        st.conv.index_copy_(1, s, hist.to(st.conv.dtype))
        st.window.index_copy_(0, s, win.to(dev))
        st.pos.index_copy_(0, s, torch.tensor([len(p) for p in prompts], device=dev))
        for slot, p in zip(slots, prompts, strict=True):
            st.lengths[slot] = len(p)
        return logits.float()

    # -- decode ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, slots: Sequence[int], tokens: Tensor) -> Tensor:
        """Feed tokens (B,) to slots (in order); returns next-token logits (B, V) float32."""
        st, bs = self.state, self.config.block_size
        n = len(slots)
        tokens = tokens.to(self.device)
        cached = [i for i, s in enumerate(slots) if st.lengths[s] < bs]
        if len(cached) == n:
            out = self._run(self.cached_step, list(slots), tokens)
        else:
            out = torch.empty(n, self.config.vocab_size, device=self.device)
            sliding = [i for i in range(n) if st.lengths[slots[i]] >= bs]
            for rows, fn in ((cached, self.cached_step), (sliding, self.window_step)):
                if rows:
                    r = torch.tensor(rows, device=self.device)
                    out[r] = self._run(fn, [slots[i] for i in rows], tokens[r])
        for s in slots:
            st.lengths[s] += 1
        return out

    def _run(self, fn, slots: list[int], tokens: Tensor) -> Tensor:
        """Pad the batch to its bucket with the scratch slot, run fn, drop the padded rows."""
        n = len(slots)
        b = pad_to(n, self.buckets)
        s = self.state.index(slots + [self.state.scratch] * (b - n))
        t = tokens if b == n else torch.cat([tokens, tokens.new_zeros(b - n)])
        return fn(s, t)[:n].float()

    def cached_step(self, s: Tensor, tokens: Tensor) -> Tensor:
        """Static-shape step for slots s (B,) all before block_size: gather, step, scatter in place."""
        st, cfg = self.state, self.config
        pos = st.pos.index_select(0, s).clamp(max=cfg.block_size - 1)  # (B,) scratch may run past the table
        hist = st.conv.index_select(1, s)  # (L, B, K-1, C)
        logits, hist = self.model.step(tokens, pos, hist)
        st.conv.index_copy_(1, s, hist)
        st.window.index_copy_(0, s, torch.cat([st.window.index_select(0, s)[:, 1:], tokens.unsqueeze(1)], 1))
        st.pos.index_copy_(0, s, pos + 1)
        return logits

    def window_step(self, s: Tensor, tokens: Tensor) -> Tensor:
        """Static-shape step past block_size: recompute the R-token window at the last R positions."""
        st, cfg = self.state, self.config
        win = torch.cat([st.window.index_select(0, s)[:, 1:], tokens.unsqueeze(1)], 1)  # (B, R)
        B, R = win.shape
        last = torch.full((B,), cfg.block_size - 1, device=win.device)
        logits, _ = self.model.window_forward(win, last, torch.full((B,), R, device=win.device))
        st.window.index_copy_(0, s, win)
        st.pos.index_copy_(0, s, st.pos.index_select(0, s) + 1)
        return logits
