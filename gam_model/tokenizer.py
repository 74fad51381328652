"""Tokenizer wrapper on Hugging Face `tokenizers`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """Encode/decode text with a `tokenizer.json`; knows the eos/bos ids from the checkpoint config."""

    def __init__(self, tok: HFTokenizer, eos_token_id: int | None = None, bos_token_id: int | None = None) -> None:
        self.tok = tok
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    @classmethod
    def from_file(cls, path: str | Path, eos_token_id: int | None = None, bos_token_id: int | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)), eos_token_id, bos_token_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i) or ""

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. a special token), or None if it is not in the vocabulary."""
        return self.tok.token_to_id(token)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))
