"""The decode step's per-token math on decode-ready weights: the same function as GAM.step, fewer kernels.

`StepWeights` precomputes what the step would otherwise rebuild every call: the conv weight transposed to
(K, C), and the gate and memory-bank projections stacked into one (2C+S, C) matrix so h is read once. The
per-layer elementwise work goes through a kernel module (`gam_model.kernels`: PyTorch reference or fused
Triton). The conv history is updated in place, so a captured graph sees static buffers only.

Every projection is applied as `addmm(bias, h, W_right)` with W_right the (in, out) right operand. By default
it is a transposed view of the (out, in) parameter, which is exactly what F.linear computes. With
`contiguous=True` it is a contiguous (in, out) copy instead: on CPU in fp32 the small-batch GEMMs read it
about 1.3x faster (bench/decode.py --only layout), for a second copy of the weights in memory.

A quantized model (gam_model.quant) gives int8 or fp8 rows with per-row scales instead: each projection is a `Proj`
that runs the same kernel as the model's own QuantLinear, so the step, the window forward and scoring agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gam_model.model import GAM
from gam_model.quant import QuantEmbedding, QuantLinear, QuantMemory, qmm


@dataclass(frozen=True)
class Proj:
    """A decode-ready projection x -> x @ W^T (+ b).

    W is either a full-precision right operand `wt` (in, out), or quantized rows `q` (out, in) with per-row `scale`
    (gam_model.quant: the same kernel as the model's QuantLinear, so the step and the forward read the same weights).
    """

    wt: Tensor | None
    b: Tensor | None = None
    q: Tensor | None = None
    scale: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        """x (B, in) -> (B, out)."""
        if self.q is not None:
            assert self.scale is not None  # quantized rows come with their scales
            y = qmm(x, self.q, self.scale)  # (B, out)
            return y if self.b is None else y.add_(self.b)
        assert self.wt is not None  # not quantized: the full-precision right operand
        return x @ self.wt if self.b is None else torch.addmm(self.b, x, self.wt)

    def columns(self, lo: int, hi: int) -> Proj:
        """The projection onto output columns [lo, hi) alone, in the same layout: a contiguous (in, out) copy stays
        one (a copy of its columns), a transposed view stays a view (bf16 on CPU runs it 13x faster than a copy)."""
        b = None if self.b is None else self.b[lo:hi]
        if self.q is not None:
            assert self.scale is not None  # quantized rows come with their scales
            return Proj(None, b, self.q[lo:hi], self.scale[lo:hi])
        assert self.wt is not None  # not quantized: the full-precision right operand
        wt = self.wt[:, lo:hi]  # (in, hi - lo)
        return Proj(wt.contiguous() if self.wt.is_contiguous() else wt, b)

    def add_to(self, out: Tensor, x: Tensor) -> Tensor:
        """out (B, out) += x (B, in) @ W^T, in place."""
        if self.q is not None:
            assert self.scale is not None  # quantized rows come with their scales
            return out.add_(qmm(x, self.q, self.scale))
        assert self.wt is not None  # not quantized: the full-precision right operand
        return out.addmm_(x, self.wt)


@dataclass(frozen=True)
class LayerWeights:
    """One block's decode-ready weights (views of the model's parameters unless noted)."""

    ln1_w: Tensor
    ln1_b: Tensor
    ln1_eps: float
    conv_w: Tensor  # (K, C) copy: causal_conv.weight (C, 1, K) transposed
    conv_b: Tensor  # (C,)
    gm: Proj  # C -> 2C+S: [gate.weight; memory_bank] stacked (a copy), bias [gate.bias; 0]
    read: Callable[[Tensor], Tensor]  # (B, S) softmax weights -> (B, C) memory read, p @ M
    ln2_w: Tensor
    ln2_b: Tensor
    ln2_eps: float
    ffn1: Proj  # C -> 4C
    ffn2: Proj  # 4C -> C, its bias applied by the gate_fuse_ln kernel (for the in-place accumulate)
    ffn2_b: Tensor


@dataclass(frozen=True)
class StepWeights:
    """Decode-ready weights of a GAM model. Build after the model has its final weights, device and dtype."""

    tok: Callable[[Tensor], Tensor]  # idx (B,) -> (B, C): the token lookup (a quantized model's dequantizes its rows)
    head: Proj  # C -> V, tied to the token table (a quantized model's: the same int8 rows)
    pos: Tensor  # (block_size, C)
    layers: tuple[LayerWeights, ...]
    lnf_w: Tensor
    lnf_b: Tensor
    lnf_eps: float

    @classmethod
    def from_model(cls, model: GAM, contiguous: bool = False) -> StepWeights:
        """contiguous: right operands as contiguous (in, out) copies instead of transposed views (see above).

        A quantized model (gam_model.quant) gives Projs of its int8/fp8 rows and scales; `contiguous` does not apply.
        Its gate and memory-bank rows are concatenated into the fused matrix (exact: one scale per row), and the
        model's modules are re-pointed at views of it, so the fused copy is the only copy.
        """

        def right(w: Tensor) -> Tensor:  # (out, in) -> (in, out)
            return w.t().contiguous() if contiguous else w.t()

        with torch.no_grad():
            layers = []
            C, S = model.config.n_embd, model.config.n_slots
            for blk in model.block_list():
                gate, mem, (f1, f2) = blk.gate, blk.memory_bank, blk.ffn_linears()
                conv_b = blk.causal_conv.bias
                # built with these biases
                assert gate.bias is not None and f2.bias is not None and conv_b is not None
                gm_b = torch.cat([gate.bias, gate.bias.new_zeros(S)])  # (2C+S,)
                read: Callable[[Tensor], Tensor]
                if isinstance(gate, QuantLinear):
                    assert isinstance(mem, QuantMemory) and isinstance(f1, QuantLinear) and isinstance(f2, QuantLinear)
                    gm_q = torch.cat([gate.qweight, mem.qweight])  # (2C+S, C) int8 rows
                    gm_s = torch.cat([gate.scale, mem.scale])  # (2C+S,)
                    gate.qweight, mem.qweight = gm_q[: 2 * C], gm_q[2 * C :]  # views: one copy in memory
                    gate.scale, mem.scale = gm_s[: 2 * C], gm_s[2 * C :]
                    gm, read = Proj(None, gm_b, gm_q, gm_s), mem.read
                    ffn1, ffn2 = (Proj(None, f.bias, f.qweight, f.scale) for f in (f1, f2))
                else:
                    assert not isinstance(mem, QuantMemory) and isinstance(f1, nn.Linear) and isinstance(f2, nn.Linear)
                    gm_w = torch.cat([gate.weight, mem])  # (2C+S, C)
                    gm, read = Proj(right(gm_w), gm_b), Proj(mem)
                    ffn1, ffn2 = Proj(right(f1.weight), f1.bias), Proj(right(f2.weight))
                layers.append(LayerWeights(
                    blk.ln1.weight, blk.ln1.bias, blk.ln1.eps,
                    blk.causal_conv.weight.squeeze(1).t().contiguous(), conv_b,
                    gm, read,
                    blk.ln2.weight, blk.ln2.bias, blk.ln2.eps,
                    ffn1, ffn2, f2.bias,
                ))  # fmt: skip
            h, emb = model.head, model.token_embedding
            head = Proj(None, None, h.qweight, h.scale) if isinstance(h, QuantLinear) else Proj(right(h.weight))
            tok = emb if isinstance(emb, QuantEmbedding) else partial(F.embedding, weight=emb.weight)
            return cls(
                tok,
                head,
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
    return w.head(hidden(w, idx, pos, hist, ops))  # (B, V)


def hidden(w: StepWeights, idx: Tensor, pos: Tensor, hist: Tensor, ops: ModuleType) -> Tensor:
    """`step` up to the head: the final LayerNorm's output (B, C), hist updated in place."""
    x = w.tok(idx) + F.embedding(pos, w.pos)  # (B, C)
    C = x.shape[-1]
    for i, lw in enumerate(w.layers):
        h, local = ops.ln_conv(x, hist[i], lw.ln1_w, lw.ln1_b, lw.ln1_eps, lw.conv_w, lw.conv_b)  # (B, C) x2
        gs = lw.gm(h)  # (B, 2C+S): gate pre-activations, then memory scores
        mem = lw.read(gs[:, 2 * C :].softmax(dim=-1))  # (B, C)
        x, h2 = ops.gate_fuse_ln(x, gs, mem, local, lw.ln2_w, lw.ln2_b, lw.ln2_eps, lw.ffn2_b)  # x = x' + b2
        lw.ffn2.add_to(x, F.gelu(lw.ffn1(h2)))  # (B, C): x' + FFN(ln2(x'))
    return F.layer_norm(x, (C,), w.lnf_w, w.lnf_b, w.lnf_eps)  # (B, C)
