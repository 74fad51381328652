"""Streaming detokenisation: turn token ids into text one token at a time without broken characters.

Method of TGI (`Model.decode_token`, prefix/read offsets): decode a short window of ids ending at the last
emitted token (the prefix) and the same window plus the new ids; the new text is the difference. Decoding a
window, not single tokens, keeps byte-level BPE spacing and word-piece joins right; holding back text that ends
in U+FFFD keeps a character spread over several byte tokens from being emitted half-finished.
"""

from __future__ import annotations

from gam_model.tokenizer import Tokenizer

PROMPT_CONTEXT = 5  # prompt tokens decoded with the first generated ones (TGI uses 5)


class IncrementalDetokenizer:
    """Per-sequence incremental decoder: add(token) -> newly final text; flush() -> the rest."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        self.ids: list[int] = context  # decoded window source: prompt context + generated ids
        self.prefix_offset = 0  # start of the window decoded as the prefix
        self.read_offset = len(context)  # end of the text already emitted
        self._text = ""  # all text emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text that became final (may be "")."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # drop ids before the window so memory and decode cost stay bounded
            if self.prefix_offset > 0:
                del self.ids[: self.prefix_offset]
                self.read_offset -= self.prefix_offset
                self.prefix_offset = 0
            self._text += new
            return new
        return ""

    def flush(self) -> str:
        """Return the held-back text (possibly ending in U+FFFD) at the end of the sequence."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        new = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._text += new
        return new

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text
