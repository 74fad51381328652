"""PyTorch reference of the decode step's per-layer elementwise work (the Triton kernels must match it).

Shapes: B rows, C = n_embd, K = conv kernel, S = memory slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ln_conv(
    x: Tensor, hist: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, conv_w: Tensor, conv_b: Tensor
) -> tuple[Tensor, Tensor]:
    """h = LayerNorm1(x); local = causal depthwise conv over [hist, h]; shift h into hist in place.

    x (B, C); hist (B, K-1, C) the previous K-1 values of h, oldest first (updated in place);
    conv_w (K, C) the conv weight transposed; conv_b (C,). Returns h (B, C) and local (B, C).
    """
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)  # (B, C)
    win = torch.cat([hist, h.unsqueeze(1)], dim=1)  # (B, K, C)
    local = (win * conv_w).sum(dim=1) + conv_b  # (B, C)
    hist.copy_(win[:, 1:])
    return h, local


def gate_fuse_ln(
    x: Tensor, g: Tensor, mem: Tensor, local: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, res_bias: Tensor
) -> tuple[Tensor, Tensor]:
    """x' = x + sigmoid(gl)*local + sigmoid(gg)*mem; returns (x' + res_bias, LayerNorm2(x')).

    x, mem, local (B, C); g (B, 2C) the gate pre-activations [gl, gg] (may be a strided view);
    res_bias (C,) the FFN's output bias, pre-added so the caller finishes the block with one in-place addmm.
    """
    C = x.shape[-1]
    xn = x + torch.sigmoid(g[:, :C]) * local + torch.sigmoid(g[:, C : 2 * C]) * mem  # (B, C)
    return xn + res_bias, F.layer_norm(xn, (C,), ln_w, ln_b, eps)
