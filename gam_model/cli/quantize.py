"""gam-quantize: write a pre-quantized copy of a checkpoint directory (int8 or fp8 weights + scales, safetensors).

The copy holds exactly what `gam-serve --quantize METHOD --dtype DTYPE` builds at load from the original, so it
serves the same logits; it loads faster (no random init, no quantization pass) and is smaller. Its config.json
gets a `quantization` entry, and it is served only as it was made (gam_model.quant.resolve says why otherwise).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from gam_model import quant
from gam_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gam-quantize", description=__doc__)
    p.add_argument("src", help="full-precision checkpoint directory")
    p.add_argument("dst", help="directory to write (created; existing files in it are overwritten)")
    p.add_argument("--method", choices=quant.METHODS, default="int8")
    p.add_argument(
        "--dtype",
        choices=list(quant.DTYPE_NAMES),
        default="bfloat16",
        help="activation dtype it is served in: the scales are rounded to it, and the tensors kept in full precision (the "
        "position table, norms, biases) are stored in it",
    )
    args = p.parse_args(argv)
    src, dst, dtype = Path(args.src), Path(args.dst), quant.DTYPE_NAMES[args.dtype]
    if src.resolve() == dst.resolve():
        sys.exit("gam-quantize: DST must differ from SRC")
    try:
        # quantized here on the CPU, whatever the method: serving fp8 needs a GPU, writing it does not
        model, tok, meta = load_checkpoint(src, "cpu", dtype, quantize="none")
    except CheckpointError as e:
        sys.exit(f"gam-quantize: {e}")
    quant.quantize_model_(model, args.method)
    meta.quantization = quant.describe(args.method, dtype)
    save_checkpoint(dst, model, tok, meta)
    if (src / "README.md").is_file():
        card = (src / "README.md").read_text()
        note = (
            f"> Pre-quantized copy ({args.method}, {args.dtype} activations) written by `gam-quantize {src} {dst}`.\n\n"
        )
        (dst / "README.md").write_text(note + card)
    for extra in sorted(src.glob("*.png")):
        shutil.copy2(extra, dst / extra.name)
    a, b = (src / "model.safetensors").stat().st_size, (dst / "model.safetensors").stat().st_size
    print(f"wrote {dst}: {args.method} weights, {args.dtype} activations; model.safetensors {a:,} -> {b:,} bytes")


if __name__ == "__main__":
    main()
