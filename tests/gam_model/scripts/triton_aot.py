"""Compile the decode step's Triton kernels ahead of time for a CUDA GPU (default sm_90, the H100), without one.

Triton's wheel ships ptxas, so the kernels go through the real GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin)
on a CPU-only machine: what the interpreter tests cannot catch (GPU-only lowering errors) shows up here. Run by
tests/gam_model/test_triton_aot.py in a fresh process, since TRITON_INTERPRET must be unset. Prints one JSON line.

    python tests/gam_model/scripts/triton_aot.py [--arch 90]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gam_model.kernels import triton_step as ts

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def source(fn: triton.JITFunction, signature: dict[str, str], constexprs: dict[str, int]) -> ASTSource:
    """An ASTSource for this Triton version (the constexpr keyword was renamed across 3.x)."""
    kw = "constexprs" if "constexprs" in inspect.signature(ASTSource.__init__).parameters else "constants"
    return ASTSource(fn, signature, **{kw: constexprs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100, 80: A100)")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    out = []
    for dt, ptr in PTR.items():
        for C, K1 in ((384, 2), (512, 2), (768, 3), (64, 1)):  # the bundled and paper widths, and others
            block = triton.next_power_of_2(C)
            opts = {"num_warps": ts._warps(block)}
            i32 = "i32"
            ln_conv = {n: ptr for n in ("X", "HIST", "LN_W", "LN_B", "CONV_W", "CONV_B", "H", "LOCAL")}
            ln_conv |= {n: i32 for n in ("stride_x", "stride_hist_b", "stride_hist_k", "stride_h", "stride_local", "C")}
            ln_conv |= {"eps": "fp32", "K1": "constexpr", "BLOCK": "constexpr"}
            fuse = {n: ptr for n in ("X", "G", "MEM", "LOCAL", "LN_W", "LN_B", "RES_B", "XOUT", "H2")}
            strides = ("stride_x", "stride_g", "stride_mem", "stride_local", "stride_xout", "stride_h2", "C")
            fuse |= {n: i32 for n in strides} | {"eps": "fp32", "BLOCK": "constexpr"}
            for name, fn, sig, const in (
                ("ln_conv", ts._ln_conv_kernel, ln_conv, {"K1": K1, "BLOCK": block}),
                ("gate_fuse_ln", ts._gate_fuse_ln_kernel, fuse, {"BLOCK": block}),
            ):
                k = triton.compile(source(fn, sig, const), target=target, options=opts)
                out.append({"kernel": name, "dtype": dt, "C": C, "K1": K1, "cubin_bytes": len(k.asm["cubin"]),
                            "ptx_target": f"sm_{args.arch}" in k.asm["ptx"]})  # fmt: skip
    print(json.dumps({"triton": triton.__version__, "arch": args.arch, "kernels": out}))


if __name__ == "__main__":
    main()
