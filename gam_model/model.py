"""The GAM language model (arXiv 2509.00605): parallel forward, window forward and the O(1) cached step.

Parameter names follow the paper's reference `GAM_Model` state dict, so its checkpoints load as they are.
Shapes: B batch, T time, C = n_embd, S = memory slots, K = conv kernel, L = layers, V = vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gam_model.config import GAMConfig

if TYPE_CHECKING:  # for annotations only: the model module stays free of gam_model.quant at runtime
    from gam_model.quant import QuantEmbedding, QuantLinear, QuantMemory


class GAMBlock(nn.Module):
    """Local causal depthwise conv + global memory read, fused by sigmoid gates; then an FFN."""

    # gam_model.quant swaps gate and ffn's Linears for QuantLinear and the memory bank for a QuantMemory, in place
    ln1: nn.LayerNorm
    causal_conv: nn.Conv1d
    memory_bank: nn.Parameter | QuantMemory  # (S, C)
    gate: nn.Linear | QuantLinear
    ln2: nn.LayerNorm
    ffn: nn.Sequential  # Linear | QuantLinear, GELU, Linear | QuantLinear, Dropout

    def __init__(self, cfg: GAMConfig) -> None:
        super().__init__()
        d, k = cfg.n_embd, cfg.conv_kernel
        self.kernel = k
        self.ln1 = nn.LayerNorm(d)
        self.causal_conv = nn.Conv1d(d, d, k, groups=d)  # weight (C, 1, K); padding done by hand (left only)
        self.memory_bank = nn.Parameter(torch.randn(cfg.n_slots, d) * 0.02)  # (S, C)
        self.gate = nn.Linear(d, 2 * d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(cfg.dropout))

    def ffn_linears(self) -> tuple[nn.Linear | QuantLinear, nn.Linear | QuantLinear]:
        """ffn's two projections (ffn[0], ffn[2]), typed (indexing nn.Sequential gives nn.Module)."""
        return cast("nn.Linear | QuantLinear", self.ffn[0]), cast("nn.Linear | QuantLinear", self.ffn[2])

    def memory_read(self, h: Tensor) -> Tensor:
        """Per-token softmax read of the memory bank: softmax(h M^T) M."""
        if isinstance(self.memory_bank, nn.Module):  # quantized in place (gam_model.quant.QuantMemory)
            return self.memory_bank(h)  # (..., C)
        scores = h @ self.memory_bank.t()  # (..., S)
        return scores.softmax(dim=-1) @ self.memory_bank  # (..., C)

    def fuse(self, x: Tensor, h: Tensor, local: Tensor) -> Tensor:
        """Gate local and global paths into the residual, then the FFN sub-block."""
        gl, gg = self.gate(h).chunk(2, dim=-1)  # (..., C) each
        x = x + torch.sigmoid(gl) * local + torch.sigmoid(gg) * self.memory_read(h)
        return x + self.ffn(self.ln2(x))

    def forward(self, x: Tensor, mask: Tensor | None = None, keep: int | None = None) -> tuple[Tensor, Tensor]:
        """Parallel block over (B, T, C); mask (B, T, 1) zeroes left-padding. Returns (x, h) with h = ln1(x).

        With `keep`, only the last `keep` positions of x are computed and returned (h stays full length).
        """
        h = self.ln1(x)  # (B, T, C)
        if mask is not None:
            h = h * mask  # padded positions read as the conv's zero padding
        if keep is not None:
            n = min(keep, x.shape[1])
            return self.fuse(x[:, -n:], h[:, -n:], self.local_tail(h, n)), h  # (B, n, C), (B, T, C)
        hp = F.pad(h.transpose(1, 2), (self.kernel - 1, 0))  # (B, C, T+K-1)
        local = F.conv1d(hp, self.causal_conv.weight, self.causal_conv.bias, groups=h.shape[-1]).transpose(1, 2)
        return self.fuse(x, h, local), h

    def local_tail(self, h: Tensor, n: int) -> Tensor:
        """The causal conv of h (B, T, C) at its last n positions only: (B, n, C), computed as `step` computes it (the
        K products in h's dtype, summed over K, then the bias). For the window path (prefill, the sliding-window
        step), where a few positions are needed and conv1d's per-call cost was most of a small block's."""
        K = self.kernel
        w = self.causal_conv.weight.squeeze(1).t()  # (K, C)
        assert self.causal_conv.bias is not None  # built with a bias
        tail = h[:, -(n + K - 1) :]  # what the last n outputs read
        hp = F.pad(tail, (0, 0, n + K - 1 - tail.shape[1], 0))  # (B, n+K-1, C): zeros before the first position
        win = hp.unfold(1, K, 1).transpose(2, 3)  # (B, n, K, C): each position's K inputs, as step's window
        return (win * w).sum(dim=2) + self.causal_conv.bias

    def step(self, x: Tensor, hist: Tensor) -> tuple[Tensor, Tensor]:
        """One token per row: x (B, C), hist (B, K-1, C) previous ln1 outputs. Returns (x, new hist)."""
        h = self.ln1(x)  # (B, C)
        win = torch.cat([hist, h.unsqueeze(1)], dim=1)  # (B, K, C)
        w = self.causal_conv.weight.squeeze(1).t()  # (K, C)
        assert self.causal_conv.bias is not None  # built with a bias
        local = (win * w).sum(dim=1) + self.causal_conv.bias  # (B, C)
        return self.fuse(x, h, local), win[:, 1:]


class GAM(nn.Module):
    """GAM language model; the head is tied to the token embedding."""

    token_embedding: nn.Embedding | QuantEmbedding  # tied to the head (its quantized rows once quantized)
    pos_embedding: nn.Embedding
    ln_f: nn.LayerNorm
    head: nn.Linear | QuantLinear  # QuantLinear once quantized (gam_model.quant)

    def __init__(self, cfg: GAMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embedding = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GAMBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def block_list(self) -> list[GAMBlock]:
        """The blocks, typed (iterating the nn.ModuleList itself gives nn.Module)."""
        return cast("list[GAMBlock]", list(self.blocks))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        """Reference parallel forward: idx (B, T) with T <= block_size -> logits (B, T, V)."""
        T = idx.shape[1]
        if self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.pos_embedding(pos))  # (B, T, C)
        for blk in self.block_list():
            x, _ = blk(x)
        return self.head(self.ln_f(x))  # (B, T, V)

    def window_forward(self, idx: Tensor, last_pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """`window_hidden`, then the head: the last position's logits (B, V) and the conv history."""
        h, hist = self.window_hidden(idx, last_pos, valid)
        return self.head(h), hist  # (B, V), (L, B, K-1, C)

    def window_hidden(self, idx: Tensor, last_pos: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Forward over right-aligned windows, for prefill and the sliding-window step.

        idx (B, W) token ids, left-padded; last_pos (B,) position of the last token; valid (B,) real tokens
        per row (at the right end). Returns the last position's final-LayerNorm output (B, C) and every layer's ln1
        output at the last K-1 positions (L, B, K-1, C), zeros where padded: the conv history.
        """
        W = idx.shape[1]
        j = torch.arange(W, device=idx.device)  # (W,)
        real = j.unsqueeze(0) >= (W - valid).unsqueeze(1)  # (B, W)
        pos = (last_pos.unsqueeze(1) - (W - 1) + j).clamp(min=0)  # (B, W)
        mask = real.unsqueeze(-1).to(self.pos_embedding.weight.dtype)  # (B, W, 1)
        x = self.token_embedding(idx) + self.pos_embedding(pos)  # (B, W, C)
        hists = []
        k1, L = self.config.history, self.config.n_layer
        for i, blk in enumerate(self.block_list()):
            # only the last (L-1-i)(K-1)+1 outputs of block i reach the last logits (a pyramid, not W per layer)
            x, h = blk(x, mask[:, -x.shape[1] :], keep=(L - 1 - i) * k1 + 1)
            hists.append(F.pad(h, (0, 0, max(k1 - h.shape[1], 0), 0))[:, -k1:] if k1 > 0 else h[:, :0])
        return self.ln_f(x[:, -1]), torch.stack(hists)  # (B, C), (L, B, K-1, C)

    def step(self, idx: Tensor, pos: Tensor, hist: Tensor) -> tuple[Tensor, Tensor]:
        """Cached decode step: idx (B,), pos (B,) < block_size, hist (L, B, K-1, C) -> logits (B, V), new hist."""
        x = self.token_embedding(idx) + self.pos_embedding(pos)  # (B, C)
        new = []
        for i, blk in enumerate(self.block_list()):
            x, hi = blk.step(x, hist[i])
            new.append(hi)
        return self.head(self.ln_f(x)), torch.stack(new)  # (B, V), (L, B, K-1, C)
