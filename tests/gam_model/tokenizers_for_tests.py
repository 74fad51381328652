"""Tiny tokenizers trained in the tests on a committed WikiText-2 excerpt (plus random Unicode)."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gam_model.tokenizer import Tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "wikitext2_valid_head.txt"
EOS = "<|endoftext|>"

# code-point pools: ASCII, accented Latin, Greek, CJK, emoji (4-byte UTF-8), plus spaces and newlines
POOLS = [
    "abcdefghijklmnopqrstuvwxyz ,.'",
    "éèêëàâäôöûüçñÉÅøß",
    "αβγδεζηθλμπσω",
    "的一是不了人我在有他这中大来上国个到说们",
    "😀😃😄😁🚀🎉👍🏽❤️🐍🌍",
    "   \n\t",
]


def random_unicode_text(rng: random.Random, n_chars: int) -> str:
    """Random text mixing scripts, emoji (incl. modifiers and ZWJ-free sequences) and whitespace."""
    return "".join(rng.choice(rng.choice(POOLS)) for _ in range(n_chars))


def corpus() -> list[str]:
    rng = random.Random(1234)
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    return lines + [random_unicode_text(rng, 80) for _ in range(20)]


@cache
def byte_bpe(vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every string encodes; characters may span several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return Tokenizer(tok, eos_token_id=tok.token_to_id(EOS))


@cache
def whitespace_bpe(vocab_size: int = 300) -> Tokenizer:
    """BPE on a Whitespace pre-tokenizer with [UNK]/[EOS], like the paper's BPE-10k tokenizer."""
    tok = HFTokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "[EOS]"], show_progress=False
    )
    tok.train_from_iterator(FIXTURE.read_text(encoding="utf-8").splitlines(), trainer)
    return Tokenizer(tok, eos_token_id=tok.token_to_id("[EOS]"))
