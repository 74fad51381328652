"""gam-train: train a tokenizer and a GAM model on text files; the run directory is a checkpoint (DESIGN 1.4)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from gam_model.data import RECIPES
from gam_model.train import TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gam-train", description=__doc__)
    d = TrainConfig(train_file="", out_dir="")
    p.add_argument("--train", dest="train_file", required=True, help="training text file (UTF-8)")
    p.add_argument("--val", dest="val_file", default=None, help="validation text file, for periodic validation")
    p.add_argument("--out", dest="out_dir", required=True, help="run directory: checkpoint, train_state.pt, log")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its train_state.pt")
    p.add_argument("--name", dest="model_name", default=d.model_name, help="model name written to config.json")
    p.add_argument(
        "--tokenizer",
        choices=RECIPES,
        default=d.tokenizer,
        help="bytelevel: byte-level BPE (keeps spacing); paper: BPE + Whitespace + [UNK] [PAD] [SOS] [EOS]",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="save and exit after this many steps in total (the run can be resumed)",
    )
    for f in fields(TrainConfig):
        if f.name in {"train_file", "val_file", "out_dir", "model_name", "tokenizer", "extra"}:
            continue
        default = getattr(d, f.name)
        typ = {"int": int, "float": float, "str": str}.get(type(default).__name__)
        if typ is None:  # Optional fields (None default): infer from the annotation
            typ = float if "float" in str(f.type) else int
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=default)
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    resume, stop_after = args.pop("resume"), args.pop("stop_after")
    cfg = TrainConfig(**args)
    print("gam-train", json.dumps({k: v for k, v in args.items() if v is not None}))
    train(cfg, resume=resume, stop_after=stop_after)


if __name__ == "__main__":
    main()
