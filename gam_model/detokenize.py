"""Streaming detokenisation: turn token ids into text one token at a time without broken characters.

Method of TGI (`Model.decode_token`, prefix/read offsets): decode a short window of ids ending at the last
emitted token (the prefix) and the same window plus the new ids; the new text is the difference. Decoding a
window, not single tokens, keeps byte-level BPE spacing and word-piece joins right; holding back text that ends
in U+FFFD keeps a character spread over several byte tokens from being emitted half-finished.

`ReferenceDetokenizer` is that algorithm in Python. `incremental_detokenizer` gives the cheapest implementation with
the reference's output, token for token (tests/gam_model/test_detokenize.py), for a tokenizer and prompt:
  - `ByteDetokenizer` for a byte-level decoder (GPT-2 style BPE: decoding is concatenating each token's bytes): a
    token's text is looked up, and bytes are decoded only while a character is unfinished. About 7x cheaper per
    token than DecodeStream's step on the bundled tokenizer, which is one of a streaming frontend's largest
    per-token costs;
  - `StreamDetokenizer` for any other decoder: the step runs in Rust (`tokenizers.decoders.DecodeStream`, the same
    prefix/read-offset method in one call instead of two Python-level decodes, about 2.4x cheaper per token);
  - the reference itself when the prompt's context ends inside a character (token-id prompts), where both of the
    others would part from it.
"""

from __future__ import annotations

from typing import Protocol

from tokenizers.decoders import DecodeStream

from gam_model.tokenizer import Tokenizer

PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones (TGI uses 5)


class ReferenceDetokenizer:
    """Per-sequence incremental decoder in Python: add(token) -> newly final text; flush() -> the rest."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        self.ids: list[int] = context  # decoded window source: prompt context + generated ids
        self.prefix_offset = 0  # start of the window decoded as the prefix
        self.read_offset = len(context)  # end of the text already emitted
        # characters emitted so far (the text itself is the caller's: kept here, it cost a copy per token)
        self.chars = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text that became final (may be "")."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            return self._emit(full[len(prefix) :])
        return ""

    def _emit(self, new: str) -> str:
        """The text `new` became final with the last id: the window moves past it."""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # drop ids before the window so memory and decode cost stay bounded
        if self.prefix_offset > 0:
            del self.ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        self.chars += len(new)
        return new

    def flush(self) -> str:
        """Return the held-back text (possibly ending in U+FFFD) at the end of the sequence."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        new = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.chars += len(new)
        return new


class StreamDetokenizer(ReferenceDetokenizer):
    """ReferenceDetokenizer with the per-token step in Rust (DecodeStream); the same text, token for token, unless the
    prompt context ends inside a character (incremental_detokenizer does not use it then)."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = False
    ) -> None:
        super().__init__(tokenizer, prompt_ids, skip_special_tokens)
        self._stream = DecodeStream(self.ids, skip_special_tokens=skip_special_tokens)
        self._tok = tokenizer.tok

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text that became final (may be "")."""
        ids = self.ids
        ids.append(token_id)
        new = self._stream.step(self._tok, token_id)
        if new:  # mirror the stream's window (ReferenceDetokenizer._emit, inline: once per token)
            del ids[: self.read_offset]
            self.prefix_offset, self.read_offset = 0, len(ids)
            self.chars += len(new)
            return new
        return ""


class ByteDetokenizer:
    """The reference's text for a byte-level decoder, from each token's bytes (`Tokenizer.byte_pieces`): decoding a
    window of such tokens is decoding their bytes joined, and an emitted window ends on a whole character, so the
    text a token adds is its own bytes decoded after those held back (an unfinished character); with none held (nearly
    always) it is a lookup. Held-back bytes go out once they no longer decode to a trailing U+FFFD, as the reference's
    window does. Needs a prompt context that does not end inside a character (incremental_detokenizer)."""

    __slots__ = ("_held", "_pieces", "_texts", "chars")

    def __init__(self, pieces: tuple[list[bytes], list[str | None]]) -> None:
        self._pieces, self._texts = pieces
        self._held = b""  # bytes of the tokens since the last emitted text (an unfinished character)
        self.chars = 0  # characters emitted so far

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text that became final (may be "")."""
        if not self._held:
            try:
                text = self._texts[token_id]
            except IndexError:  # past the vocabulary: decodes to nothing, as the tokenizer's decode
                return ""
            if text is not None:
                self.chars += len(text)
                return text
        pieces = self._pieces
        held = self._held + (pieces[token_id] if token_id < len(pieces) else b"")
        text = held.decode("utf-8", "replace")
        if text and not text.endswith("\ufffd"):
            self._held = b""
            self.chars += len(text)
            return text
        self._held = held
        return ""

    def flush(self) -> str:
        """Return the held-back text (ending in U+FFFD) at the end of the sequence."""
        text = self._held.decode("utf-8", "replace")
        self._held = b""
        self.chars += len(text)
        return text


class Detokenizer(Protocol):
    """What incremental_detokenizer returns: add(token) -> newly final text; flush() -> the rest; chars emitted."""

    chars: int

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


def incremental_detokenizer(
    tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = False
) -> Detokenizer:
    """The cheapest detokenizer with the reference's output for this tokenizer and prompt (the module docstring)."""
    context = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
    # an unfinished character at the context's end: the others decode the text a token adds on its own (bytes) or
    # offset by bytes (DecodeStream) where the reference offsets by characters
    if context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
        return ReferenceDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    pieces = tokenizer.byte_pieces(skip_special_tokens)
    if pieces is not None:
        return ByteDetokenizer(pieces)
    return StreamDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
