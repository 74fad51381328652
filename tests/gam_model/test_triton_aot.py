"""The Triton kernels compile to real GPU code (PTX and cubin for sm_90 / H100, and sm_80) on this CPU-only machine.

The interpreter tests (test_triton.py) check the kernels' numbers; this checks that the GPU lowering accepts them,
which the interpreter never exercises. The compile runs in a fresh process: TRITON_INTERPRET must be unset there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "scripts" / "triton_aot.py"


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_to_cubin_for_the_gpu(arch: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    kernels = res["kernels"]
    assert len(kernels) == 2 * 3 * 4  # both kernels x fp32/bf16/fp16 x four widths
    assert all(k["cubin_bytes"] > 1000 and k["ptx_target"] for k in kernels), kernels
