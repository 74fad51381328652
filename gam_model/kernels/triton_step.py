"""Fused Triton kernels for the decode step's per-layer elementwise work (same API as reference.py).

One program per row; the row's C channels live in one block. `ln_conv` fuses LayerNorm1, the depthwise
conv over the cached history and the history shift (in place); `gate_fuse_ln` fuses both sigmoid gates,
the residual update and LayerNorm2. Statistics and sums are in fp32; stored values are rounded to the
tensors' dtype. Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _ln_conv_kernel(
    X,
    HIST,
    LN_W,
    LN_B,
    CONV_W,
    CONV_B,
    H,
    LOCAL,
    stride_x,
    stride_hist_b,
    stride_hist_k,
    stride_h,
    stride_local,
    C,
    eps,
    K1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    w = tl.load(LN_W + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(LN_B + cols, mask=m, other=0.0).to(tl.float32)
    h = (d * rstd * w + b).to(H.dtype.element_ty)  # rounded like the reference's LayerNorm output
    tl.store(H + row * stride_h + cols, h, mask=m)
    acc = tl.load(CONV_B + cols, mask=m, other=0.0).to(tl.float32)
    hrow = HIST + row * stride_hist_b
    for j in tl.static_range(K1):  # oldest first; shift each value one place towards the front
        hj = tl.load(hrow + j * stride_hist_k + cols, mask=m, other=0.0)
        acc += hj.to(tl.float32) * tl.load(CONV_W + j * C + cols, mask=m, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(hrow + (j - 1) * stride_hist_k + cols, hj, mask=m)
    acc += h.to(tl.float32) * tl.load(CONV_W + K1 * C + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(hrow + (K1 - 1) * stride_hist_k + cols, h.to(HIST.dtype.element_ty), mask=m)
    tl.store(LOCAL + row * stride_local + cols, acc.to(LOCAL.dtype.element_ty), mask=m)


@triton.jit
def _gate_fuse_ln_kernel(
    X,
    G,
    MEM,
    LOCAL,
    LN_W,
    LN_B,
    RES_B,
    XOUT,
    H2,
    stride_x,
    stride_g,
    stride_mem,
    stride_local,
    stride_xout,
    stride_h2,
    C,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < C
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    gl = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    gg = tl.load(G + row * stride_g + C + cols, mask=m, other=0.0).to(tl.float32)
    mem = tl.load(MEM + row * stride_mem + cols, mask=m, other=0.0).to(tl.float32)
    local = tl.load(LOCAL + row * stride_local + cols, mask=m, other=0.0).to(tl.float32)
    xn = x + tl.sigmoid(gl) * local + tl.sigmoid(gg) * mem
    xn = xn.to(XOUT.dtype.element_ty).to(tl.float32)  # the residual stream is stored in the model dtype
    rb = tl.load(RES_B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(XOUT + row * stride_xout + cols, (xn + rb).to(XOUT.dtype.element_ty), mask=m)
    mean = tl.sum(tl.where(m, xn, 0.0), axis=0) / C
    d = tl.where(m, xn - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    w = tl.load(LN_W + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(LN_B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(H2 + row * stride_h2 + cols, (d * rstd * w + b).to(H2.dtype.element_ty), mask=m)


def _warps(block: int) -> int:
    return 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8


def ln_conv(
    x: Tensor, hist: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, conv_w: Tensor, conv_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Fused reference.ln_conv: x (B, C), hist (B, K-1, C) shifted in place, conv_w (K, C) -> (h, local)."""
    B, C = x.shape
    K1 = hist.shape[1]
    assert x.stride(-1) == 1 and hist.stride(-1) == 1 and conv_w.is_contiguous() and conv_w.shape == (K1 + 1, C)
    h, local = x.new_empty(B, C), x.new_empty(B, C)
    block = triton.next_power_of_2(C)
    _ln_conv_kernel[(B,)](
        x,
        hist,
        ln_w,
        ln_b,
        conv_w,
        conv_b,
        h,
        local,
        x.stride(0),
        hist.stride(0),
        hist.stride(1),
        h.stride(0),
        local.stride(0),
        C,
        eps,
        K1=K1,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return h, local


def gate_fuse_ln(
    x: Tensor, g: Tensor, mem: Tensor, local: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, res_bias: Tensor
) -> tuple[Tensor, Tensor]:
    """Fused reference.gate_fuse_ln: returns (x' + res_bias, LayerNorm2(x')), each (B, C)."""
    B, C = x.shape
    assert all(t.stride(-1) == 1 for t in (x, g, mem, local)) and g.shape[1] >= 2 * C
    xout, h2 = x.new_empty(B, C), x.new_empty(B, C)
    block = triton.next_power_of_2(C)
    _gate_fuse_ln_kernel[(B,)](
        x,
        g,
        mem,
        local,
        ln_w,
        ln_b,
        res_bias,
        xout,
        h2,
        x.stride(0),
        g.stride(0),
        mem.stride(0),
        local.stride(0),
        xout.stride(0),
        h2.stride(0),
        C,
        eps,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return xout, h2
