"""gam-eval: perplexity and bits per byte of a checkpoint directory on text files (exact sliding-window scoring)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gam_model.checkpoint import CheckpointError, load_checkpoint
from gam_model.cli import add_load_arguments
from gam_model.data import read_text
from gam_model.evaluate import MODES, evaluate_text
from gam_model.quant import CLI_DTYPES, quantization_of


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gam-eval", description=__doc__)
    p.add_argument(
        "--model", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json)"
    )
    p.add_argument("texts", nargs="+", help="UTF-8 text files, each scored as one stream")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="sliding",
        help="sliding: exact for the served semantics (default); chunked: non-overlapping block_size chunks",
    )
    add_load_arguments(p)
    p.add_argument("--batch-size", type=int, default=256, help="windows per forward past block_size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, meta = load_checkpoint(args.model, args.device, CLI_DTYPES[args.dtype], args.quantize)
    except CheckpointError as e:
        raise SystemExit(f"gam-eval: {e}") from e
    dtype = str(model.pos_embedding.weight.dtype).removeprefix("torch.")
    results = {}
    for path in args.texts:
        r = evaluate_text(model, tok, read_text(path), batch_size=args.batch_size, progress=True, mode=args.mode)
        results[path] = r.to_dict()
        print(
            f"{path}: {r.tokens} tokens, {r.bytes} bytes, loss {r.loss:.4f}, ppl {r.perplexity:.2f}, "
            f"bits/byte {r.bits_per_byte:.4f}",
            flush=True,
        )
    out = {
        "model": str(Path(args.model)),
        "model_name": meta.model_name,
        "dtype": dtype,
        "quantization": quantization_of(model),
        "mode": args.mode,
        "results": results,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
