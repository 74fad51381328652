"""Text loading and tokenizer training for gam-train / gam-eval.

Two tokenizer recipes:
- "bytelevel" (default): byte-level BPE (GPT-2 style); decoding restores the text's exact spacing.
- "paper": the GAM paper's recipe: BPE with a Whitespace pre-tokenizer and `[UNK] [PAD] [SOS] [EOS]`
  (decoded text loses its original spacing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gam_model.tokenizer import Tokenizer

RECIPES = ("bytelevel", "paper")
ENDOFTEXT = "<|endoftext|>"
PAPER_SPECIALS = ("[UNK]", "[PAD]", "[SOS]", "[EOS]")


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file as it is (no newline translation)."""
    return Path(path).read_bytes().decode("utf-8")


def train_tokenizer(files: Sequence[str | Path], recipe: str = "bytelevel", vocab_size: int = 8192) -> Tokenizer:
    """Train a BPE tokenizer on `files` with one of RECIPES; bos/eos ids are set on the result."""
    if recipe == "bytelevel":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[ENDOFTEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
            show_progress=False,
        )
        hf.train([str(f) for f in files], trainer)
        eos = bos = hf.token_to_id(ENDOFTEXT)
    elif recipe == "paper":
        hf = HFTokenizer(models.BPE(unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(PAPER_SPECIALS), show_progress=False)
        hf.train([str(f) for f in files], trainer)
        bos, eos = hf.token_to_id("[SOS]"), hf.token_to_id("[EOS]")
    else:
        raise ValueError(f"unknown tokenizer recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return Tokenizer(hf, eos_token_id=eos, bos_token_id=bos)


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """Names of the bos/eos tokens, for the checkpoint config."""
    out = {}
    if tok.bos_token_id is not None:
        out["bos_token"] = tok.id_to_token(tok.bos_token_id)
    if tok.eos_token_id is not None:
        out["eos_token"] = tok.id_to_token(tok.eos_token_id)
    return out


def start_token(tok: Tokenizer) -> int | None:
    """The token that opens a stream: bos, else eos (the byte-level recipe uses one `<|endoftext|>`)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def encode_stream(tok: Tokenizer, text: str) -> np.ndarray:
    """Encode a whole text as one token stream, opened by the start token when the tokenizer has one."""
    ids = tok.encode(text)
    first = start_token(tok)
    head = [first] if first is not None else []
    return np.asarray(head + ids, dtype=np.int64)
