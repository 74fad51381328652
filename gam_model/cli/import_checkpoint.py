"""gam-import: turn the paper's reference `.pt` state dict + tokenizer.json into a checkpoint directory."""

from __future__ import annotations

import argparse
import sys

from gam_model.checkpoint import CheckpointError, load_checkpoint
from gam_model.importer import import_reference


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gam-import", description=__doc__)
    p.add_argument("--state-dict", required=True, help="reference checkpoint (torch.save(model.state_dict()))")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer.json of the model")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", default=None, help="hyper-parameters JSON (reference ModelConfig or GAMConfig names)")
    hp = p.add_argument_group("hyper-parameters (override --config and the values inferred from tensor shapes)")
    for flag in ("vocab-size", "block-size", "n-embd", "n-layer", "n-slots", "conv-kernel"):
        hp.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--name", default=None, help="model name (default: the output directory's name)")
    p.add_argument("--eos-token", default=None, help='eos token text, e.g. "[EOS]" (default: a common spelling)')
    args = p.parse_args(argv)
    overrides = {
        k: getattr(args, k) for k in ("vocab_size", "block_size", "n_embd", "n_layer", "n_slots", "conv_kernel")
    }
    try:
        out = import_reference(
            args.state_dict,
            args.tokenizer,
            args.out,
            hparams_path=args.config,
            overrides=overrides,
            name=args.name,
            eos_token=args.eos_token,
        )
        model, _, meta = load_checkpoint(out)  # read back what was written, as the server will
    except CheckpointError as e:
        sys.exit(f"gam-import: {e}")
    cfg = model.config
    print(
        f"wrote {out}: {meta.model_name}, {cfg.num_params():,} parameters, vocab {cfg.vocab_size}, "
        f"block {cfg.block_size}, {cfg.n_layer} layers, d {cfg.n_embd}, eos id {meta.eos_token_id}"
    )


if __name__ == "__main__":
    main()
