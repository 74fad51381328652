"""The fused Triton kernels equal the PyTorch reference, run on CPU in Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # triton.jit reads this when it decorates, so it must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import gam_model.kernels.triton_step as tri  # noqa: E402
from gam_model.decode import Decoder  # noqa: E402
from gam_model.kernels import reference  # noqa: E402
from gam_model.step import StepWeights, step  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.gam_model.test_decode import teacher_force  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Without CUDA the kernels must be interpreted; if triton was imported earlier in this process without
# TRITON_INTERPRET, they were not, and the tests rerun this file in a fresh process instead.
RUNNABLE = CUDA or all(
    isinstance(f, InterpretedFunction) for f in (tri._ln_conv_kernel, tri._gate_fuse_ln_kernel, triton.language.sum)
)
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="triton imported before TRITON_INTERPRET: see the rerun")


@pytest.mark.skipif(RUNNABLE, reason="kernels runnable in this process")
def test_rerun_in_a_fresh_interpreter_process() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ passed, 1 skipped in", summary), r.stdout[-1000:]  # only this rerun test skips there


@needs_kernels
def test_kernels_really_run_in_the_interpreter_without_cuda() -> None:
    assert CUDA or isinstance(tri._ln_conv_kernel, InterpretedFunction)
    x = torch.ones(2, 8, device=DEVICE)
    h, _ = tri.ln_conv(
        x, torch.zeros(2, 1, 8, device=DEVICE), x[0], x[0] * 0, 1e-5, torch.ones(2, 8, device=DEVICE), x[0]
    )
    assert torch.equal(h, torch.zeros_like(h))  # a constant row normalizes to the bias


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0):
    return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("C", [32, 48, 512])
def test_ln_conv_matches_reference(C: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(C + k)
    B = 5
    x = randn(B, C, g=g, dtype=dtype, scale=2, shift=0.5)
    hist = randn(3, B, k - 1, C, g=g, dtype=dtype)[1]  # a (B, K-1, C) layer view of an (L, B, K-1, C) tensor
    ln_w, ln_b = randn(C, g=g, dtype=dtype, scale=0.1, shift=1), randn(C, g=g, dtype=dtype, scale=0.1)
    conv_w, conv_b = randn(k, C, g=g, dtype=dtype), randn(C, g=g, dtype=dtype)
    hist_ref = hist.clone()
    h_ref, local_ref = reference.ln_conv(x, hist_ref, ln_w, ln_b, 1e-5, conv_w, conv_b)
    h, local = tri.ln_conv(x, hist, ln_w, ln_b, 1e-5, conv_w, conv_b)
    assert h.dtype == local.dtype == dtype
    assert (h.float() - h_ref.float()).abs().max() <= tol(dtype) * 4  # LayerNorm output is O(1)
    scale = local_ref.float().abs().max()
    assert (local.float() - local_ref.float()).abs().max() <= tol(dtype) * scale
    assert (hist.float() - hist_ref.float()).abs().max() <= tol(dtype) * 4  # shifted in place, h appended


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [32, 48, 512])
def test_gate_fuse_ln_matches_reference(C: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(C)
    B, S = 4, 24
    x, mem, local = (randn(B, C, g=g, dtype=dtype) for _ in range(3))
    gs = randn(B, 2 * C + S, g=g, dtype=dtype, scale=3)  # gates then memory scores, as the step lays them out
    ln_w, ln_b = randn(C, g=g, dtype=dtype, scale=0.1, shift=1), randn(C, g=g, dtype=dtype, scale=0.1)
    res_b = randn(C, g=g, dtype=dtype)
    xr_ref, h2_ref = reference.gate_fuse_ln(x, gs, mem, local, ln_w, ln_b, 1e-5, res_b)
    xr, h2 = tri.gate_fuse_ln(x, gs, mem, local, ln_w, ln_b, 1e-5, res_b)
    scale = xr_ref.float().abs().max()
    assert (xr.float() - xr_ref.float()).abs().max() <= tol(dtype) * scale
    assert (h2.float() - h2_ref.float()).abs().max() <= tol(dtype) * 4


@needs_kernels
def test_fused_step_matches_pytorch_step() -> None:
    model = tiny_model(n_layer=3, n_embd=48).to(DEVICE)
    cfg = model.config
    w = StepWeights.from_model(model)
    g = torch.Generator().manual_seed(5)
    B = 3
    idx = torch.randint(0, cfg.vocab_size, (B,), generator=g).to(DEVICE)
    pos = torch.tensor([0, 7, cfg.block_size - 1], device=DEVICE)
    hist = randn(cfg.n_layer, B, cfg.history, cfg.n_embd, g=g, dtype=torch.float32)
    with torch.no_grad():
        ref_logits, ref_hist = model.step(idx, pos, hist.clone())
        h_torch, h_tri = hist.clone(), hist.clone()
        torch_logits = step(w, idx, pos, h_torch, reference)
        tri_logits = step(w, idx, pos, h_tri, tri)
    assert (torch_logits - ref_logits).abs().max() <= 1e-4
    assert (tri_logits - ref_logits).abs().max() <= 1e-4
    assert (h_torch - ref_hist).abs().max() <= 1e-5
    assert (h_tri - ref_hist).abs().max() <= 1e-5


@needs_kernels
def test_decoder_with_triton_kernels_matches_forward_across_block_size() -> None:
    model = tiny_model()
    bs = model.config.block_size
    seq = torch.randint(0, model.config.vocab_size, (bs + 2,), generator=torch.Generator().manual_seed(6)).tolist()
    dec = Decoder(tiny_model(), num_slots=2, device=DEVICE, kernels="triton", cuda_graphs=False)
    assert dec.kernels == "triton"
    assert teacher_force(model, seq[:8], 1, dec) <= 1e-4  # cached steps from the first token
    assert teacher_force(model, seq, bs - 4, dec) <= 1e-4  # cached steps, then past block_size


@needs_kernels
def test_kernels_are_found_usable_and_chosen_by_the_probe() -> None:
    from gam_model import kernels

    assert kernels.usable_on(torch.device(DEVICE), torch.float32)
    assert kernels.usable_on(torch.device(DEVICE), torch.bfloat16)
