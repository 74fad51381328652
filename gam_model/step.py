"""The decode step's per-token math on decode-ready weights: the same function as GAM.step, fewer kernels.

`StepWeights` precomputes what the step would otherwise rebuild every call: the conv weight transposed to
(K, C), and the gate and memory-bank projections stacked into one (2C+S, C) matrix so h is read once. The
per-layer elementwise work goes through a kernel module (`gam_model.kernels`: PyTorch reference or fused
Triton). The conv history is updated in place, so a captured graph sees static buffers only.

Every projection is applied as `addmm(bias, h, W_right)` with W_right the (in, out) right operand. By default
it is a transposed view of the (out, in) parameter, which is exactly what F.linear computes. With
`contiguous=True` it is a contiguous (in, out) copy instead: on CPU in fp32 the small-batch GEMMs read it
about 1.3x faster (bench/decode.py --only layout), for a second copy of the weights in memory.
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
    gm_wt: Tensor  # (C, 2C+S) right operand of [gate.weight; memory_bank] (a copy either way)
    gm_b: Tensor  # (2C+S,) copy: [gate.bias; 0]
    memory: Tensor  # (S, C)
    ln2_w: Tensor
    ln2_b: Tensor
    ln2_eps: float
    ffn1_wt: Tensor  # (C, 4C) right operand of ffn.0.weight
    ffn1_b: Tensor
    ffn2_wt: Tensor  # (4C, C) right operand of ffn.2.weight, for the in-place addmm
    ffn2_b: Tensor


@dataclass(frozen=True)
class StepWeights:
    """Decode-ready weights of a GAM model. Build after the model has its final weights, device and dtype."""

    tok: Tensor  # (V, C) token embedding
    head_t: Tensor  # (C, V) right operand of the head (tied to tok)
    pos: Tensor  # (block_size, C)
    layers: tuple[LayerWeights, ...]
    lnf_w: Tensor
    lnf_b: Tensor
    lnf_eps: float

    @classmethod
    def from_model(cls, model: GAM, contiguous: bool = False) -> StepWeights:
        """contiguous: right operands as contiguous (in, out) copies instead of transposed views (see above)."""

        def right(w: Tensor) -> Tensor:  # (out, in) -> (in, out)
            return w.t().contiguous() if contiguous else w.t()

        with torch.no_grad():
            layers = []
            for blk in model.blocks:
                gm_w = torch.cat([blk.gate.weight, blk.memory_bank])  # (2C+S, C)
                gm_b = torch.cat([blk.gate.bias, blk.gate.bias.new_zeros(blk.memory_bank.shape[0])])  # (2C+S,)
                layers.append(LayerWeights(
                    blk.ln1.weight, blk.ln1.bias, blk.ln1.eps,
                    blk.causal_conv.weight.squeeze(1).t().contiguous(), blk.causal_conv.bias,
                    right(gm_w), gm_b, blk.memory_bank,
                    blk.ln2.weight, blk.ln2.bias, blk.ln2.eps,
                    right(blk.ffn[0].weight), blk.ffn[0].bias, right(blk.ffn[2].weight), blk.ffn[2].bias,
                ))  # fmt: skip
            return cls(
                model.token_embedding.weight,
                right(model.token_embedding.weight),
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
        gs = torch.addmm(lw.gm_b, h, lw.gm_wt)  # (B, 2C+S): gate pre-activations, then memory scores
        mem = gs[:, 2 * C :].softmax(dim=-1) @ lw.memory  # (B, C)
        x, h2 = ops.gate_fuse_ln(x, gs, mem, local, lw.ln2_w, lw.ln2_b, lw.ln2_eps, lw.ffn2_b)  # x = x' + b2
        x.addmm_(F.gelu(torch.addmm(lw.ffn1_b, h2, lw.ffn1_wt)), lw.ffn2_wt)  # (B, C): x' + FFN(ln2(x'))
    return F.layer_norm(x, (C,), w.lnf_w, w.lnf_b, w.lnf_eps) @ w.head_t  # (B, V)
