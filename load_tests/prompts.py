"""Prompts sampled from the committed WikiText-2 excerpt (load_tests/prompts.txt)."""

from __future__ import annotations

import random
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")


class PromptSampler:
    """Draws prompts of about n words: a random run of consecutive words from the corpus (wrapping around)."""

    def __init__(self, path: str | Path = DEFAULT_PROMPTS, seed: int = 0) -> None:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        self.words = [w for ln in lines if not ln.startswith("#") for w in ln.split()]
        if not self.words:
            raise ValueError(f"{path}: no prompt text")
        self.rng = random.Random(seed)

    def sample(self, n_words: int) -> str:
        """A prompt of n_words words (n_words >= 1), repeating the corpus if it is shorter."""
        if n_words < 1:
            raise ValueError("a prompt needs at least one word")
        start = self.rng.randrange(len(self.words))
        out = [self.words[(start + i) % len(self.words)] for i in range(n_words)]
        return " ".join(out)
