"""gam-generate: generate text from a checkpoint directory on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gam_model.checkpoint import CheckpointError, find_single_checkpoint, load_checkpoint
from gam_model.cli import add_load_arguments
from gam_model.decode import Decoder
from gam_model.generate import generate
from gam_model.quant import CLI_DTYPES
from gam_model.sampling import SamplingParams

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"


def default_model_dir() -> Path:
    """The single model under weights/ (the bundled one); same rule as gam-serve."""
    return find_single_checkpoint(WEIGHTS_DIR)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gam-generate", description=__doc__)
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the model in weights/)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--typical-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    add_load_arguments(p)
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="gam-serve's batch-invariant mode: each prompt's tokens are bit-identical alone or beside others, and "
        "equal a --deterministic server's on CPU (README)",
    )
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--verbose", action="store_true", help="print seed, token count and finish reason to stderr")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.stream and len(args.prompt) > 1:
        p.error("--stream takes a single --prompt")
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    try:
        params.validate()
    except ValueError as e:
        p.error(str(e))
    try:
        model, tok, _ = load_checkpoint(
            args.model or default_model_dir(), args.device, CLI_DTYPES[args.dtype], args.quantize
        )
    except CheckpointError as e:
        sys.exit(f"gam-generate: {e}")
    decoder = Decoder(model, num_slots=len(args.prompt), deterministic=args.deterministic)

    def stream(_: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    results = generate(
        decoder, tok, args.prompt, params, args.max_new_tokens, stop=args.stop, on_text=stream if args.stream else None
    )
    for r in results:
        if args.stream:
            print()
        else:
            print(r.text)
        if args.verbose:
            how = "greedy" if params.greedy else f"seed {r.seed}"
            print(f"[{how}, {len(r.token_ids)} tokens, finish {r.finish_reason}]", file=sys.stderr)


if __name__ == "__main__":
    main()
