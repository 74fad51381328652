"""Per-layer elementwise work of the decode step: a readable PyTorch reference and a fused Triton version.

Both modules expose the same two functions, `ln_conv` and `gate_fuse_ln` (see reference.py for the math).
Triton is an optional import (mamba_ssm style): `triton_available()` says whether it can be used; the
Triton module is only imported when asked for, so TRITON_INTERPRET set before that import takes effect.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from types import ModuleType

import torch

from gam_model.kernels import reference


def triton_available() -> bool:
    """True if the triton package is importable."""
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True if Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def usable_on(device: torch.device, dtype: torch.dtype) -> bool:
    """True if the Triton kernels import and run on this device (a one-row launch; a failure warns)."""
    if not triton_available():
        return False
    try:
        tri = load("triton")
        x = torch.ones(1, 8, device=device, dtype=dtype)  # (1, C)
        w = torch.ones(2, 8, device=device, dtype=dtype)  # (K, C)
        tri.ln_conv(x, torch.zeros(1, 1, 8, device=device, dtype=dtype), x[0], x[0], 1e-5, w, x[0])
        return True
    except Exception as e:  # e.g. no compiler or an unsupported GPU: the PyTorch reference serves instead
        warnings.warn(f"Triton kernels unusable on {device} ({type(e).__name__}: {e}); using PyTorch", stacklevel=2)
        return False


def load(name: str) -> ModuleType:
    """The kernel module for "torch" (reference) or "triton" (fused; needs triton)."""
    if name == "torch":
        return reference
    if name == "triton":
        if not triton_available():
            raise RuntimeError("kernels='triton' needs the triton package (pip install '.[triton]')")
        from gam_model.kernels import triton_step

        return triton_step
    raise ValueError(f"kernels must be 'torch' or 'triton', got {name!r}")
