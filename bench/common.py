"""Shared by the bench scripts: a description of the machine the figures came from."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, cores, bf16 support, torch version and threads."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in info,
        "amx_bf16": "amx_bf16" in info,
        "python": platform.python_version(),
    }
