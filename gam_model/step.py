"""The decode step's per-token math on decode-ready weights: the same function as GAM.step, fewer kernels.

`StepWeights` precomputes what the step would otherwise rebuild every call: the conv weight transposed to
(K, C), and the gate and memory-bank projections stacked into one (2C+S, C) matrix so h is read once. The
per-layer elementwise work goes through a kernel module (`gam_model.kernels`: PyTorch reference or fused
Triton). The conv history is updated in place, so a captured graph sees static buffers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from gam_model.model import GAM


@dataclass(frozen=True)
class LayerWeights:
    """One block's decode-ready weights (views of the model's parameters unless noted)."""

    ln1_w: Tensor
    ln1_b: Tensor
    ln1_eps: float
    conv_w: Tensor  # (K, C) copy: causal_conv.weight (C, 1, K) transposed
    conv_b: Tensor  # (C,)
    gm_w: Tensor  # (2C+S, C) copy: [gate.weight; memory_bank]
    gm_b: Tensor  # (2C+S,) copy: [gate.bias; 0]
    memory: Tensor  # (S, C)
    ln2_w: Tensor
    ln2_b: Tensor
    ln2_eps: float
    ffn1_w: Tensor  # (4C, C)
    ffn1_b: Tensor
    ffn2_wt: Tensor  # (4C, C) view: ffn.2.weight transposed, the right operand of the in-place addmm
    ffn2_b: Tensor


@dataclass(frozen=True)
class StepWeights:
    """Decode-ready weights of a GAM model. Build after the model has its final weights, device and dtype."""

    tok: Tensor  # (V, C), also the head
    pos: Tensor  # (block_size, C)
    layers: tuple[LayerWeights, ...]
    lnf_w: Tensor
    lnf_b: Tensor
    lnf_eps: float

    @classmethod
    def from_model(cls, model: GAM) -> StepWeights:
        with torch.no_grad():
            layers = []
            for blk in model.blocks:
                gm_w = torch.cat([blk.gate.weight, blk.memory_bank])  # (2C+S, C)
                gm_b = torch.cat([blk.gate.bias, blk.gate.bias.new_zeros(blk.memory_bank.shape[0])])  # (2C+S,)
                layers.append(LayerWeights(
                    blk.ln1.weight, blk.ln1.bias, blk.ln1.eps,
                    blk.causal_conv.weight.squeeze(1).t().contiguous(), blk.causal_conv.bias,
                    gm_w, gm_b, blk.memory_bank,
                    blk.ln2.weight, blk.ln2.bias, blk.ln2.eps,
                    blk.ffn[0].weight, blk.ffn[0].bias, blk.ffn[2].weight.t(), blk.ffn[2].bias,
                ))  # fmt: skip
            return cls(
                model.token_embedding.weight,
                model.pos_embedding.weight,
                tuple(layers),
                model.ln_f.weight,
                model.ln_f.bias,
                model.ln_f.eps,
            )


def step(w: StepWeights, idx: Tensor, pos: Tensor, hist: Tensor, ops: ModuleType) -> Tensor:
    """Cached decode step: idx (B,), pos (B,) < block_size, hist (L, B, K-1, C) updated in place -> logits (B, V).

    The same math as GAM.step; `ops` is a kernel module from gam_model.kernels (reference or triton).
    """
    x = F.embedding(idx, w.tok) + F.embedding(pos, w.pos)  # (B, C)
    C = x.shape[-1]
    for i, lw in enumerate(w.layers):
        h, local = ops.ln_conv(x, hist[i], lw.ln1_w, lw.ln1_b, lw.ln1_eps, lw.conv_w, lw.conv_b)  # (B, C) x2
        gs = F.linear(h, lw.gm_w, lw.gm_b)  # (B, 2C+S): gate pre-activations, then memory scores
        mem = gs[:, 2 * C :].softmax(dim=-1) @ lw.memory  # (B, C)
        x, h2 = ops.gate_fuse_ln(x, gs, mem, local, lw.ln2_w, lw.ln2_b, lw.ln2_eps, lw.ffn2_b)  # x = x' + b2
        x.addmm_(F.gelu(F.linear(h2, lw.ffn1_w, lw.ffn1_b)), lw.ffn2_wt)  # (B, C): x' + FFN(ln2(x'))
    return F.linear(F.layer_norm(x, (C,), w.lnf_w, w.lnf_b, w.lnf_eps), w.tok)  # (B, V)
