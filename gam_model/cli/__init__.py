"""Command-line tools (gam-train, gam-generate, gam-eval, gam-import, gam-quantize)."""

from __future__ import annotations

import argparse

from gam_model.quant import CHOICES, CLI_DTYPES


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantize and --device: how a tool loads a checkpoint, the way gam-serve does (gam-generate,
    gam-eval); pass the parsed values to load_checkpoint with `CLI_DTYPES[args.dtype]`."""
    p.add_argument(
        "--dtype",
        choices=CLI_DTYPES,
        default="auto",
        help="auto: as gam-serve (fp32 on CPU, bf16 on CUDA or quantized)",
    )
    p.add_argument(
        "--quantize",
        choices=CHOICES,
        default="auto",
        help="weights as gam-serve --quantize loads them (auto: as stored)",
    )
    p.add_argument("--device", default="cpu")
