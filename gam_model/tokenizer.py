"""Tokenizer wrapper on Hugging Face `tokenizers`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Encoding, decoders
from tokenizers import Tokenizer as HFTokenizer


def _byte_level_chars() -> dict[str, int]:
    """The byte-level (GPT-2) alphabet: the character that stands for each byte in a byte-level token, inverted.
    Printable Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in kept}
    others = [b for b in range(256) if b not in chars.values()]
    chars.update({chr(256 + n): b for n, b in enumerate(others)})
    return chars


BYTE_LEVEL_CHARS = _byte_level_chars()


class Tokenizer:
    """Encode/decode text with a `tokenizer.json`; knows the eos/bos ids from the checkpoint config."""

    def __init__(self, tok: HFTokenizer, eos_token_id: int | None = None, bos_token_id: int | None = None) -> None:
        self.tok = tok
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self._max_token_bytes = self._bytes_bound(tok)
        self._alone: dict[int, str] = {}  # token_text's answers so far
        self._pieces: dict[bool, tuple[list[bytes], list[str | None]] | None] = {}  # byte_pieces' answers

    @staticmethod
    def _bytes_bound(tok: HFTokenizer) -> int | None:
        """Most UTF-8 bytes of input one token can stand for, where that is bounded: a byte-level BPE without a
        normalizer turns every input byte into part of exactly one vocabulary piece (or added token). None otherwise
        (a Whitespace pre-tokenizer drops bytes, a WordLevel [UNK] swallows a whole word)."""
        pre = getattr(tok.pre_tokenizer, "__class__", type(None)).__name__
        if tok.normalizer is not None or pre != "ByteLevel" or type(tok.model).__name__ != "BPE":
            return None
        return max(len(piece.encode("utf-8")) for piece in tok.get_vocab())

    @classmethod
    def from_file(cls, path: str | Path, eos_token_id: int | None = None, bos_token_id: int | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(path)), eos_token_id, bos_token_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The token ids of text, without the offsets and masks an Encoding also computes (`encode_batch_fast`:
        about 0.8x the CPU of `encode` for a 64-word prompt; the same ids, tests/gam_model/test_tokenizer.py)."""
        return self.tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_releasing_gil(self, text: str, add_special_tokens: bool = False) -> Encoding:
        """Encode one text, with its offsets, without holding the GIL (`encode_batch` releases it, `encode` does
        not), for a worker thread: other Python threads (an event loop, the engine) keep running meanwhile."""
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) computed without tokenizing (0 when the tokenizer gives none): lets
        a server refuse a far too long prompt at once instead of spending seconds tokenizing it."""
        if self._max_token_bytes is None:
            return 0
        return -(-len(text.encode("utf-8")) // self._max_token_bytes)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_releasing_gil(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """`decode` without holding the GIL (`decode_batch` releases it, `decode` does not), for a worker thread."""
        return self.tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    def token_text(self, i: int) -> str:
        """decode([i]): one token's text decoded alone (how alternatives are named), remembered per id: a response
        with top-n logprobs names up to n alternatives per token, from a vocabulary's worth of ids at most."""
        text = self._alone.get(i)
        if text is None:
            text = self._alone[i] = self.decode([i])
        return text

    def byte_pieces(self, skip_special_tokens: bool = False) -> tuple[list[bytes], list[str | None]] | None:
        """For a byte-level decoder (decoding = joining each token's bytes, then UTF-8 with U+FFFD for what is not):
        (each id's bytes, each id's text where those bytes are whole characters not ending in U+FFFD, else None).
        None for any other decoder. Built once, and checked against this tokenizer's own decode of every id: a
        tokenizer whose decode differs (an unknown decoder option) gets None, never a wrong text."""
        if skip_special_tokens not in self._pieces:
            self._pieces[skip_special_tokens] = self._byte_pieces(skip_special_tokens)
        return self._pieces[skip_special_tokens]

    def _byte_pieces(self, skip: bool) -> tuple[list[bytes], list[str | None]] | None:
        if not isinstance(self.tok.decoder, decoders.ByteLevel):
            return None
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special} if skip else set()
        vocab = self.tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values(), default=-1) + 1
        if size > 2 * len(vocab) + 256:  # ids mostly holes (one far above the rest): no table as long as the max id
            return None
        pieces, texts = [], []
        for i in range(size):
            token = self.tok.id_to_token(i)
            if token is None or i in special:
                piece = b""
            else:  # the tokenizer's ByteLevel decoder: each character's byte, or the token's UTF-8 if one has none
                try:
                    piece = bytes(BYTE_LEVEL_CHARS[c] for c in token)
                except KeyError:
                    piece = token.encode("utf-8")
            if self.tok.decode([i], skip_special_tokens=skip) != piece.decode("utf-8", "replace"):
                return None
            try:
                text: str | None = piece.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            pieces.append(piece)
            texts.append(None if text is None or text.endswith("\ufffd") else text)
        return pieces, texts

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i) or ""

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. a special token), or None if it is not in the vocabulary."""
        return self.tok.token_to_id(token)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))
